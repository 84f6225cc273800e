"""DHC equals ``code/train_dhc.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/dhc.pt),
with the DiffDW / DistDW class weights and statistics checked after each iteration."""

from __future__ import annotations

import io

import pytest
import torch

from skcdf.methods.dhc import DHCConfig, DHCState, dhc_step
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches,
                                  build_net, inputs, load_fixture, relative_difference, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def _state(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, DHCState, DHCConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    config = DHCConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"],
                       diffdw_accumulate_iters=hp["diffdw_accumulate_iters"], distdw_momentum=hp["distdw_momentum"])
    state = DHCState.create(net_b, sgd(net_b, fixture), fixture["labeled_class_counts"], config, dtype=torch.float64)
    return net_a, sgd(net_a, fixture), state, config


def _assert_statistics(state: DHCState, reference: dict[str, torch.Tensor], what: str) -> None:
    ours = {**state.diffdw.state_dict(), "weights_B": state.distdw.weights}
    for key, value in reference.items():
        assert relative_difference(ours[key], value) <= LOSS_TOLERANCE, f"{what}: {key}"


def test_dhc_replays_two_dhc_iterations():
    fixture = load_fixture("dhc")
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = _state(fixture)
    _assert_statistics(state, fixture["dhc_state0"], "initial statistics")
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        terms = dhc_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
        what = f"iteration {i + 1}"
        assert relative_difference(terms["weight_A"], fixture["weight_A"][i]) <= LOSS_TOLERANCE, what
        assert relative_difference(terms["weight_B"], fixture["weight_B"][i]) <= LOSS_TOLERANCE, what
        _assert_statistics(state, fixture["dhc_state"][i], what)
        assert_losses_match(terms, fixture["losses"][i], what, LOSS_NAMES)
        assert_state_matches(net_a, fixture[f"state{i + 1}"]["A"], STATE_TOLERANCE[i], f"A after {what}")
        assert_state_matches(state.net_b, fixture[f"state{i + 1}"]["B"], STATE_TOLERANCE[i], f"B after {what}")


def test_dhc_state_round_trip_resumes_bit_exactly():
    """Save the state after iteration 1, restore it into fresh objects: iteration 2 gives the same bits."""
    fixture = load_fixture("dhc")
    hp = fixture["hparams"]
    x_l, y_l, x_u = inputs(fixture)
    net_a, optimizer_a, state, config = _state(fixture)
    net_a.dropout.replay(fixture["draws"][0]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][0]["dropout"]["B"])
    dhc_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
    buffer = io.BytesIO()  # through a file, as a checkpoint would: also checks weights_only loading
    torch.save({"net_a": net_a.state_dict(), "optimizer_a": optimizer_a.state_dict(), "state": state.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    runs = []
    for resume in (False, True):
        if resume:
            net_a, optimizer_a, state, config = _state(fixture)
            net_a.load_state_dict(saved["net_a"])
            optimizer_a.load_state_dict(saved["optimizer_a"])
            state.load_state_dict(saved["state"])
        net_a.dropout.replay(fixture["draws"][1]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][1]["dropout"]["B"])
        terms = dhc_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        runs.append((terms["total"], [p.detach().clone() for p in net_a.parameters()],
                     [p.detach().clone() for p in state.net_b.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1] + runs[0][2], runs[1][1] + runs[1][2]))
