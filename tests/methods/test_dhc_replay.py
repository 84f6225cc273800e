"""DHC equals ``code/train_dhc.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/dhc.pt),
with the DiffDW / DistDW class weights and statistics checked after each iteration."""

from __future__ import annotations

import torch

from skcdf.methods.dhc import DHCConfig, DHCState, dhc_step
from tests.methods.replay import (LOSS_TOLERANCE, PairReplay, build_net, relative_difference, replay_pair, resume_pair,
                                  schedule, sgd)


def _state(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, DHCState, DHCConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    config = DHCConfig(**schedule(hp),
                       diffdw_accumulate_iters=hp["diffdw_accumulate_iters"], distdw_momentum=hp["distdw_momentum"])
    state = DHCState.create(net_b, sgd(net_b, fixture), fixture["labeled_class_counts"], config, dtype=torch.float64)
    return net_a, sgd(net_a, fixture), state, config


def _assert_statistics(state: DHCState, reference: dict[str, torch.Tensor], what: str) -> None:
    ours = {**state.diffdw.state_dict(), "weights_B": state.distdw.weights}
    for key, value in reference.items():
        assert relative_difference(ours[key], value) <= LOSS_TOLERANCE, f"{what}: {key}"


def check(fixture: dict, i: int, state: DHCState, terms: dict) -> None:
    what = f"iteration {i + 1}"
    assert relative_difference(terms["weight_A"], fixture["weight_A"][i]) <= LOSS_TOLERANCE, what
    assert relative_difference(terms["weight_B"], fixture["weight_B"][i]) <= LOSS_TOLERANCE, what
    _assert_statistics(state, fixture["dhc_state"][i], what)


def check_start(fixture: dict, state: DHCState) -> None:
    _assert_statistics(state, fixture["dhc_state0"], "initial statistics")


METHOD = PairReplay("dhc", _state, dhc_step, check_start=check_start, check=check)


def test_dhc_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_dhc_state_round_trip_resumes_bit_exactly():
    """Save the state after iteration 1, restore it into fresh objects: iteration 2 gives the same bits."""
    resume_pair(METHOD)
