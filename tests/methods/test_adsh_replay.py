"""Adsh equals DHC's ``code/train_adsh.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/adsh.pt)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from skcdf.methods.adsh import AdshBank, AdshConfig, AdshState, adsh_step
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches,
                                  build_net, inputs, load_fixture, relative_difference, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def bank_at_start(fixture: dict, name: str) -> AdshBank:
    """The bank the recorder set: rows [0:2] = softmax of the upsampled coarse logits, 2 stored."""
    hp = fixture["hparams"]
    start = fixture["adsh_start"][name]
    bank = AdshBank(hp["num_classes"], hp["patch"], hp["bank_size"], hp["thresh_major"], dtype=torch.float64)
    rows = F.interpolate(start["coarse_logits"].double(), size=tuple(hp["patch"]), mode="trilinear",
                         align_corners=False).softmax(1)
    bank.scores[:rows.shape[0]] = rows
    bank.count = start["cur_iter"]
    bank.thresholds.copy_(start["thresholds"].double())
    return bank


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, AdshState, AdshConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    state = AdshState(net_b, sgd(net_b, fixture), bank_at_start(fixture, "A"), bank_at_start(fixture, "B"))
    config = AdshConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"],
                        thresh_major=hp["thresh_major"])
    return net_a, sgd(net_a, fixture), state, config


def test_adsh_replays_two_dhc_iterations():
    fixture = load_fixture("adsh")
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):  # iteration 1 stores its unlabeled softmax in the bank, iteration 2 recomputes
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        terms = adsh_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, bank in (("A", state.bank_a), ("B", state.bank_b)):
            reference = fixture["adsh"][i][name]
            assert bank.count == reference["cur_iter"]
            assert relative_difference(bank.thresholds, reference["thresholds"]) <= LOSS_TOLERANCE
            assert terms[f"map_{name}"] == reference["sample_map_count"].tolist()
        for name, net in (("A", net_a), ("B", state.net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_adsh_resumes_from_saved_state():
    fixture = load_fixture("adsh")
    hp = fixture["hparams"]
    x_l, y_l, x_u = inputs(fixture)
    net_a, optimizer_a, state, config = start(fixture)
    net_a.dropout.replay(fixture["draws"][0]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][0]["dropout"]["B"])
    adsh_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
    saved = copy.deepcopy((net_a.state_dict(), optimizer_a.state_dict(), state.state_dict()))
    other_a, other_opt, restored, _ = start(fixture)
    restored.bank_a = AdshBank(1, (1,), 1)  # load_state_dict restores the sizes too
    other_a.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    restored.load_state_dict(saved[2])
    for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_opt, restored)):
        net.dropout.replay(fixture["draws"][1]["dropout"]["A"])
        st.net_b.dropout.replay(fixture["draws"][1]["dropout"]["B"])
        adsh_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config)
    for a, b in ((state.bank_a, restored.bank_a), (state.bank_b, restored.bank_b)):
        assert torch.equal(a.thresholds, b.thresholds) and torch.equal(a.scores, b.scores) and a.count == b.count
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
