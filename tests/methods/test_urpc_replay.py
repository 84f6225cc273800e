"""URPC equals DHC's ``code/train_urpc.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/urpc.pt)."""

from __future__ import annotations

import pytest
import torch

from skcdf.methods.urpc import LOSS_TERMS, UNet3DDeepSupervision, URPCConfig, URPCState, urpc_step
from tests.methods.replay import (STATE_TOLERANCE, assert_losses_match, assert_state_matches, inputs, load_fixture,
                                  schedule, sgd)

LOSS_NAMES = {name: name for name in LOSS_TERMS if name != "cps_w"}


def build(fixture: dict) -> UNet3DDeepSupervision:
    hp = fixture["hparams"]
    net = UNet3DDeepSupervision(1, hp["num_classes"], hp["feature_scale"]).double()
    net.load_state_dict(fixture["state0"]["model"], strict=True)
    return net


def test_urpc_replays_two_dhc_iterations():
    fixture = load_fixture("urpc")
    hp = fixture["hparams"]
    net = build(fixture)
    assert [m.p for m in net.dropouts()] == hp["dropout_p"]
    optimizer = sgd(net, fixture)
    config = URPCConfig(**schedule(hp))
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net.replay_dropout(fixture["draws"][i]["dropout"]["model"])
        terms = urpc_step(net, optimizer, URPCState(), x_l, y_l, x_u, hp["epoch"], config)
        assert all(m.pending == 0 for m in net.dropouts())
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        assert_state_matches(net, fixture[f"state{i + 1}"]["model"], STATE_TOLERANCE[i],
                             f"model after iteration {i + 1}", key_map=lambda key: key)


def test_urpc_eval_gives_the_finest_output():
    fixture = load_fixture("urpc")
    net = build(fixture).eval()
    x_l, _, _ = inputs(fixture)
    with torch.no_grad():
        out = net(x_l)
    assert out.shape == (x_l.shape[0], fixture["hparams"]["num_classes"], *x_l.shape[2:])
