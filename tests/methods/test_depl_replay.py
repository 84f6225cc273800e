"""DePL equals DHC's ``code/train_depl.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/depl.pt)."""

from __future__ import annotations

import copy

import pytest
import torch

from skcdf.methods.depl import DePLConfig, DePLState, depl_step, initial_qhat
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches,
                                  build_net, inputs, load_fixture, relative_difference, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, DePLState, DePLConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    patch = hp["patch"]
    qhat = {name: q.double().view(1, -1, 1, 1, 1).expand(1, q.numel(), *patch).clone()
            for name, q in fixture["qhat0_class"].items()}
    state = DePLState(net_b, sgd(net_b, fixture), qhat["A"], qhat["B"])
    config = DePLConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"],
                        tau=hp["tau"], threshold=hp["threshold"], qhat_momentum=hp["qhat_momentum"])
    return net_a, sgd(net_a, fixture), state, config


def test_depl_replays_two_dhc_iterations():
    fixture = load_fixture("depl")
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        terms = depl_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
        assert terms["mask_A"] == fixture["pseudo_mask_count"][i]["A"]
        assert terms["mask_B"] == fixture["pseudo_mask_count"][i]["B"]
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, qhat in (("A", state.qhat_a), ("B", state.qhat_b)):
            flat = qhat.reshape(qhat.shape[1], -1)
            reference = fixture["qhat"][i][name]
            assert relative_difference(flat.sum(1), reference["class_sum"]) <= LOSS_TOLERANCE
            assert relative_difference(flat[:, ::hp["qhat_stride"]], reference["sample"]) <= LOSS_TOLERANCE
        for name, net in (("A", net_a), ("B", state.net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_depl_initial_marginal_and_resume():
    fixture = load_fixture("depl")
    hp = fixture["hparams"]
    q = initial_qhat(hp["num_classes"], hp["patch"])
    assert q.shape == (1, hp["num_classes"], *hp["patch"]) and torch.allclose(q.sum(1), torch.ones(1))
    x_l, y_l, x_u = inputs(fixture)
    net_a, optimizer_a, state, config = start(fixture)
    net_a.dropout.replay(fixture["draws"][0]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][0]["dropout"]["B"])
    depl_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
    saved = copy.deepcopy((net_a.state_dict(), optimizer_a.state_dict(), state.state_dict()))
    other_a, other_opt, restored, _ = start(fixture)
    other_a.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    restored.load_state_dict(saved[2])
    for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_opt, restored)):
        net.dropout.replay(fixture["draws"][1]["dropout"]["A"])
        st.net_b.dropout.replay(fixture["draws"][1]["dropout"]["B"])
        depl_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config)
    assert torch.equal(state.qhat_a, restored.qhat_a) and torch.equal(state.qhat_b, restored.qhat_b)
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
