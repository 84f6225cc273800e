"""Basak et al. equals DHC's ``code/train_acisis.py``: two recorded float64 iterations replayed
(tests/fixtures/dhc/acisis.pt). The dropout masks of student and teacher and the sampling map's uniforms are
injected; iteration 1 completes an epoch's statistics and recomputes the class rates."""

from __future__ import annotations

import copy

import pytest
import torch

from skcdf.methods.acisis import AcisisConfig, AcisisState, ClassRates, acisis_step
from tests.methods.replay import (LOSS_TOLERANCE, STATE_TOLERANCE, assert_losses_match, assert_state_matches, build_net,
                                  inputs, load_fixture, relative_difference, schedule, sgd)

LOSS_NAMES = {name: name for name in ("sup", "cps", "total")}


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, AcisisState, AcisisConfig]:
    hp = fixture["hparams"]
    config = AcisisConfig(update_iter=hp["update_iter"], **schedule(hp), ema_decay=hp["ema_decay"],
                          cc_momentum=hp["cc_momentum"], top_m=hp["top_m"], p_fr=hp["P_FR"], p_ccf=float(hp["P_CCF"]),
                          lambda_=hp["lambda_"], beta=hp["beta"])
    student, teacher = build_net(fixture, "student"), build_net(fixture, "teacher")
    rates = ClassRates(hp["num_classes"], config, dtype=torch.float64)
    begin = fixture["confidence_start"]
    rates.entropy, rates.confidence, rates.variance = (begin[k].double() for k in ("entropy", "confidence", "variance"))
    rates.cc = begin["CC"].double()
    rate = 1 - rates.cc
    rates.sam_rate = torch.pow(rate / (rate.max() + 1e-12), config.lambda_)
    rates.count = begin["cur_iter"]
    return student, sgd(student, fixture), AcisisState(teacher, rates), config


def test_acisis_replays_two_dhc_iterations():
    fixture = load_fixture("acisis")
    hp = fixture["hparams"]
    student, optimizer, state, config = start(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    assert config.ema_alpha_at(hp["epoch"]) == hp["ema_alpha"]
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        student.dropout.replay(fixture["draws"][i]["dropout"]["student"])
        state.teacher.dropout.replay(fixture["draws"][i]["dropout"]["teacher"])
        terms = acisis_step(student, optimizer, state, x_l, y_l, x_u, hp["epoch"], config,
                            uniform=fixture["sampling_uniform"][i].double())
        assert student.dropout.pending == 0 and state.teacher.dropout.pending == 0
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        assert terms["sample_map_sum"] == pytest.approx(fixture["sample_map_sum"][i], rel=LOSS_TOLERANCE)
        reference = fixture["confidence_array"][i]
        assert state.rates.count == reference["cur_iter"]
        ours = state.rates.state_dict()
        for key, theirs in (("entropy", "entropy"), ("confidence", "confidence"), ("variance", "variance"),
                            ("cc", "CC"), ("sam_rate", "sam_rate")):
            assert relative_difference(ours[key], reference[theirs]) <= LOSS_TOLERANCE, f"{key} after {i + 1}"
        for name, net in (("student", student), ("teacher", state.teacher)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_acisis_resumes_from_saved_state():
    fixture = load_fixture("acisis")
    hp = fixture["hparams"]
    x_l, y_l, x_u = inputs(fixture)
    student, optimizer, state, config = start(fixture)
    student.dropout.replay(fixture["draws"][0]["dropout"]["student"])
    state.teacher.dropout.replay(fixture["draws"][0]["dropout"]["teacher"])
    acisis_step(student, optimizer, state, x_l, y_l, x_u, hp["epoch"], config,
                uniform=fixture["sampling_uniform"][0].double())
    saved = copy.deepcopy((student.state_dict(), optimizer.state_dict(), state.state_dict()))
    other, other_opt, restored, _ = start(fixture)
    other.load_state_dict(saved[0])
    other_opt.load_state_dict(saved[1])
    restored.load_state_dict(saved[2])
    for net, opt, st in ((student, optimizer, state), (other, other_opt, restored)):
        net.dropout.replay(fixture["draws"][1]["dropout"]["student"])
        st.teacher.dropout.replay(fixture["draws"][1]["dropout"]["teacher"])
        acisis_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config, uniform=fixture["sampling_uniform"][1].double())
    assert torch.equal(state.rates.sam_rate, restored.rates.sam_rate)
    for a, b in ((student, other), (state.teacher, restored.teacher)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
