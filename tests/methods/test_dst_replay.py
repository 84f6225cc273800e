"""DST equals DHC's ``code/train_dst.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/dst.pt)."""

from __future__ import annotations

import copy

import pytest
import torch

from skcdf.methods.dst import DecoupledVNet, DSTConfig, DSTState, dst_step, dst_to_skcdf_key, from_dhc_dst_state_dict
from tests.methods.replay import (STATE_TOLERANCE, assert_losses_match, assert_state_matches, inputs, load_fixture,
                                  schedule, sgd)

LOSS_NAMES = {name: name for name in ("sup_A", "sup_B", "cps_A", "cps_B", "worst_A", "worst_B", "sup", "cps",
                                      "worst", "total")}


def build_dst_net(fixture: dict, name: str) -> DecoupledVNet:
    args = fixture["model_args"]
    net = DecoupledVNet(args["n_channels"], args["n_classes"], args["n_filters"], dropout=args["has_dropout"]).double()
    return from_dhc_dst_state_dict(net, fixture["state0"][name])


def config_of(fixture: dict) -> DSTConfig:
    hp = fixture["hparams"]
    return DSTConfig(**schedule(hp),
                     confidence_threshold=hp["confidence_threshold"], grl_alpha=hp["grl_alpha"], grl_lo=hp["grl_lo"],
                     grl_hi=hp["grl_hi"], grl_max_iters=hp["grl_max_iters"])


def test_dst_replays_two_dhc_iterations():
    fixture = load_fixture("dst")
    hp = fixture["hparams"]
    net_a, net_b = build_dst_net(fixture, "A"), build_dst_net(fixture, "B")
    optimizer_a = sgd(net_a, fixture)
    state = DSTState(net_b, sgd(net_b, fixture), grl_iterations=fixture["grl_iter0"])
    config = config_of(fixture)
    assert config.weight_at(hp["epoch"]) == pytest.approx(hp["cps_w"], rel=1e-15)
    pseudo0 = {k: v.clone() for k, v in net_a.decoders["pseudo"].named_parameters()}
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        net_a.replay_dropout(fixture["draws"][i]["dropout"]["A"])
        net_b.replay_dropout(fixture["draws"][i]["dropout"]["B"])
        terms = dst_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
        assert all(m.pending == 0 for net in (net_a, net_b) for m in net.dropouts())
        assert terms["cps_w"] == hp["cps_w"]
        assert state.grl_iterations == fixture["grl_iter"][i]["A"] == fixture["grl_iter"][i]["B"]
        assert terms["mask_A"] == fixture["pseudo_mask_count"][i]["A"]
        assert terms["mask_B"] == fixture["pseudo_mask_count"][i]["B"]
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        for name, net in (("A", net_a), ("B", net_b)):
            assert_state_matches(net, fixture[f"state{i + 1}"][name], STATE_TOLERANCE[i],
                                 f"{name} after iteration {i + 1}", key_map=dst_to_skcdf_key)
    # as in DHC's code, the pseudo decoder gets no gradient: its parameters never move
    assert all(torch.equal(p, pseudo0[k]) for k, p in net_a.decoders["pseudo"].named_parameters())


def test_dst_resumes_from_saved_state():
    fixture = load_fixture("dst")
    hp = fixture["hparams"]
    config = config_of(fixture)
    x_l, y_l, x_u = inputs(fixture)
    net_a, net_b = build_dst_net(fixture, "A"), build_dst_net(fixture, "B")
    optimizer_a = sgd(net_a, fixture)
    state = DSTState(net_b, sgd(net_b, fixture), grl_iterations=fixture["grl_iter0"])
    net_a.replay_dropout(fixture["draws"][0]["dropout"]["A"])
    net_b.replay_dropout(fixture["draws"][0]["dropout"]["B"])
    dst_step(net_a, optimizer_a, state, x_l, y_l, x_u, hp["epoch"], config)
    # deep copies, as torch.save would make: state dicts share storage with the live tensors
    saved_a, saved_opt, saved_state = copy.deepcopy((net_a.state_dict(), optimizer_a.state_dict(), state.state_dict()))
    other_a, other_b = build_dst_net(fixture, "A"), build_dst_net(fixture, "B")
    other_a.load_state_dict(saved_a)
    other_opt = sgd(other_a, fixture)
    other_opt.load_state_dict(saved_opt)
    restored = DSTState(other_b, sgd(other_b, fixture))
    restored.load_state_dict(saved_state)
    assert restored.grl_iterations == fixture["grl_iter"][0]["A"]
    for net, opt, st in ((net_a, optimizer_a, state), (other_a, other_opt, restored)):
        net.replay_dropout(fixture["draws"][1]["dropout"]["A"])
        st.net_b.replay_dropout(fixture["draws"][1]["dropout"]["B"])
        dst_step(net, opt, st, x_l, y_l, x_u, hp["epoch"], config)
    for a, b in ((net_a, other_a), (state.net_b, restored.net_b)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
