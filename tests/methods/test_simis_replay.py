"""SimiS equals DHC's ``code/train_simis.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/simis.pt)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from skcdf.methods.simis import SimiSConfig, SimiSState, SimiSWeights, simis_gaps, simis_step
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches,
                                  build_net, inputs, load_fixture, relative_difference, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, SimiSState, SimiSConfig]:
    hp = fixture["hparams"]
    counts = fixture["labeled_class_counts"].numpy()
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    weights = [SimiSWeights(counts, hp["simis_momentum"], dtype=torch.float64) for _ in range(2)]
    state = SimiSState(net_b, sgd(net_b, fixture), *weights)
    config = SimiSConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"],
                         momentum=hp["simis_momentum"])
    return net_a, sgd(net_a, fixture), state, config


def test_simis_gaps():
    gaps = simis_gaps(np.array([6.0, 3.0, 1.0, 0.0]))
    np.testing.assert_allclose(gaps, [0.0, 0.3, 0.5, 0.6], rtol=1e-8, atol=1e-8)
    weights = SimiSWeights(np.array([6.0, 3.0, 1.0, 0.0]), momentum=0.99, dtype=torch.float64)
    torch.testing.assert_close(weights.weights, 0.99 * 4 + 0.01 * 4 * torch.tensor(gaps), rtol=1e-15, atol=0)


def test_simis_replays_two_dhc_iterations():
    fixture = load_fixture("simis")
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    for name, w in (("A", state.weights_a), ("B", state.weights_b)):
        assert relative_difference(w.weights, fixture["simis_weights0"][name]) <= LOSS_TOLERANCE
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        terms = simis_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
        for name, w in (("A", state.weights_a), ("B", state.weights_b)):
            assert relative_difference(w.weights, fixture["class_weights"][i][name]) <= LOSS_TOLERANCE
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, net in (("A", net_a), ("B", state.net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_simis_resumes_from_saved_state():
    fixture = load_fixture("simis")
    hp = fixture["hparams"]
    x_l, y_l, x_u = inputs(fixture)
    net_a, optimizer_a, state, config = start(fixture)
    net_a.dropout.replay(fixture["draws"][0]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][0]["dropout"]["B"])
    simis_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
    saved = copy.deepcopy((net_a.state_dict(), optimizer_a.state_dict(), state.state_dict()))
    other_a, other_opt, restored, _ = start(fixture)
    other_a.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    restored.load_state_dict(saved[2])
    for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_opt, restored)):
        net.dropout.replay(fixture["draws"][1]["dropout"]["A"])
        st.net_b.dropout.replay(fixture["draws"][1]["dropout"]["B"])
        simis_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config)
    assert torch.equal(state.weights_a.weights, restored.weights_a.weights)
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
