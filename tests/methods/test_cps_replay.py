"""CPS equals DHC's ``code/train_cps.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/cps.pt)."""

from __future__ import annotations

import pytest
import torch

from skcdf.methods.common import lr_during_epoch
from skcdf.methods.cps import CPSConfig, CPSState, cps_step
from tests.methods.replay import PairReplay, build_net, load_fixture, replay_pair, schedule, sgd


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, CPSState, CPSConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    config = CPSConfig(**schedule(hp))
    return net_a, sgd(net_a, fixture), CPSState(net_b, sgd(net_b, fixture)), config


def check(fixture: dict, i: int, state: CPSState, terms: dict) -> None:
    hp = fixture["hparams"]
    assert lr_during_epoch(hp["epoch"], hp["base_lr"], hp["max_epoch"]) == pytest.approx(hp["lr"], rel=1e-15)
    assert terms["cps_w"] == hp["cps_w"]


def test_cps_replays_two_dhc_iterations():
    replay_pair(PairReplay("cps", start, cps_step, check=check))


def test_cps_state_round_trip():
    fixture = load_fixture("cps")
    net_b = build_net(fixture, "B")
    state = CPSState(net_b, sgd(net_b, fixture))
    saved = state.state_dict()
    other = build_net(fixture, "A")
    restored = CPSState(other, sgd(other, fixture))
    restored.load_state_dict(saved)
    assert all((a == b).all() for a, b in zip(other.state_dict().values(), net_b.state_dict().values()))
