"""CLD equals DHC's ``code/train_cld.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/cld.pt).
The dropout masks and the sampling maps' uniforms are injected; iteration 1 completes a bank period."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from skcdf.methods.cld import CLDConfig, CLDState, ConfidenceBank, cld_class_weights, cld_step
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches,
                                  build_net, inputs, load_fixture, relative_difference, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, CLDState, CLDConfig]:
    hp = fixture["hparams"]
    config = CLDConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"],
                       update_iter=hp["confs_iter"], momentum=hp["confs_momentum"], gamma=hp["sampling_gamma"])
    banks = {}
    for name, begin in fixture["bank_start"].items():
        bank = ConfidenceBank(begin["confs"].double(), config.update_iter, config.momentum)
        bank.conf_sum, bank.count = begin["confs_all"].double(), begin["confs_cnt"].double()
        bank.batches = begin["tot_iter"]
        banks[name] = bank
    weight = torch.as_tensor(cld_class_weights(fixture["labeled_class_counts"].numpy()), dtype=torch.float64)
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    state = CLDState(net_b, sgd(net_b, fixture), weight, banks["A"], banks["B"])
    return net_a, sgd(net_a, fixture), state, config


def test_cld_class_weights_are_dhcs():
    fixture = load_fixture("cld")
    ours = cld_class_weights(fixture["labeled_class_counts"].numpy())
    assert ours.dtype == np.float32
    assert torch.equal(torch.as_tensor(ours, dtype=torch.float64), fixture["cld_weight"])


def test_cld_replays_two_dhc_iterations():
    fixture = load_fixture("cld")
    hp = fixture["hparams"]
    net_a, optimizer_a, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        state.net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        uniforms = tuple(fixture["sampling_uniform"][i][name].double() for name in ("A", "B"))
        terms = cld_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config, uniforms=uniforms)
        assert net_a.dropout.pending == 0 and state.net_b.dropout.pending == 0
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, bank in (("A", state.bank_a), ("B", state.bank_b)):
            reference = fixture["banks"][i][name]
            assert terms[f"map_{name}"] == fixture["sample_map_sum"][i][name]
            assert bank.batches == reference["tot_iter"]
            assert relative_difference(bank.confs, reference["confs"]) <= LOSS_TOLERANCE
            assert relative_difference(bank.conf_sum, reference["confs_all"]) <= LOSS_TOLERANCE
            assert torch.equal(bank.count, reference["confs_cnt"])
        for name, net in (("A", net_a), ("B", state.net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_cld_resumes_from_saved_state():
    fixture = load_fixture("cld")
    hp = fixture["hparams"]
    x_l, y_l, x_u = inputs(fixture)
    net_a, optimizer_a, state, config = start(fixture)
    uniforms = [tuple(fixture["sampling_uniform"][i][name].double() for name in ("A", "B")) for i in range(2)]
    net_a.dropout.replay(fixture["draws"][0]["dropout"]["A"])
    state.net_b.dropout.replay(fixture["draws"][0]["dropout"]["B"])
    cld_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config, uniforms=uniforms[0])
    saved = copy.deepcopy((net_a.state_dict(), optimizer_a.state_dict(), state.state_dict()))
    other_a, other_opt, restored, _ = start(fixture)
    other_a.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    restored.load_state_dict(saved[2])
    for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_opt, restored)):
        net.dropout.replay(fixture["draws"][1]["dropout"]["A"])
        st.net_b.dropout.replay(fixture["draws"][1]["dropout"]["B"])
        cld_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config, uniforms=uniforms[1])
    assert torch.equal(state.bank_a.confs, restored.bank_a.confs)
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
