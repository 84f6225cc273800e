"""CPS equals DHC's ``code/train_cps.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/cps.pt)."""

from __future__ import annotations

import pytest

from skcdf.methods.common import lr_during_epoch
from skcdf.methods.cps import CPSConfig, CPSState, cps_step
from tests.methods.replay import (STATE_TOLERANCE, assert_losses_match, assert_state_matches, build_net, inputs,
                                  load_fixture, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "total")}


def test_cps_replays_two_dhc_iterations():
    fixture = load_fixture("cps")
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    optimizer_a = sgd(net_a, fixture)
    state = CPSState(net_b, sgd(net_b, fixture))
    config = CPSConfig(cps_weight=hp["cps_w_max"], max_epoch=hp["max_epoch"], rampup=hp["cps_rampup"])
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    assert lr_during_epoch(hp["epoch"], hp["base_lr"], hp["max_epoch"]) == pytest.approx(hp["lr"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.dropout.replay(fixture["draws"][i]["dropout"]["A"])
        net_b.dropout.replay(fixture["draws"][i]["dropout"]["B"])
        terms = cps_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert net_a.dropout.pending == 0 and net_b.dropout.pending == 0
        assert terms["cps_w"] == hp["cps_w"]
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, net in (("A", net_a), ("B", net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i], f"{name} after iteration {i + 1}")


def test_cps_state_round_trip():
    fixture = load_fixture("cps")
    net_b = build_net(fixture, "B")
    state = CPSState(net_b, sgd(net_b, fixture))
    saved = state.state_dict()
    other = build_net(fixture, "A")
    restored = CPSState(other, sgd(other, fixture))
    restored.load_state_dict(saved)
    assert all((a == b).all() for a, b in zip(other.state_dict().values(), net_b.state_dict().values()))
