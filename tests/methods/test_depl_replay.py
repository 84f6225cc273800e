"""DePL equals DHC's ``code/train_depl.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/depl.pt)."""

from __future__ import annotations

import torch

from skcdf.methods.depl import DePLConfig, DePLState, depl_step, initial_qhat
from tests.methods.replay import (LOSS_TOLERANCE, PairReplay, build_net, load_fixture, relative_difference, replay_pair,
                                  resume_pair, schedule, sgd)


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, DePLState, DePLConfig]:
    hp = fixture["hparams"]
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    patch = hp["patch"]
    qhat = {name: q.double().view(1, -1, 1, 1, 1).expand(1, q.numel(), *patch).clone()
            for name, q in fixture["qhat0_class"].items()}
    state = DePLState(net_b, sgd(net_b, fixture), qhat["A"], qhat["B"])
    config = DePLConfig(**schedule(hp), tau=hp["tau"], threshold=hp["threshold"], qhat_momentum=hp["qhat_momentum"])
    return net_a, sgd(net_a, fixture), state, config


def check(fixture: dict, i: int, state: DePLState, terms: dict) -> None:
    """The pseudo-label masks' sizes and the marginals q̂ (their class sums and a strided sample)."""
    assert terms["mask_A"] == fixture["pseudo_mask_count"][i]["A"]
    assert terms["mask_B"] == fixture["pseudo_mask_count"][i]["B"]
    for name, qhat in (("A", state.qhat_a), ("B", state.qhat_b)):
        flat = qhat.reshape(qhat.shape[1], -1)
        reference = fixture["qhat"][i][name]
        assert relative_difference(flat.sum(1), reference["class_sum"]) <= LOSS_TOLERANCE
        assert relative_difference(flat[:, ::fixture["hparams"]["qhat_stride"]], reference["sample"]) <= LOSS_TOLERANCE


METHOD = PairReplay("depl", start, depl_step, check=check)


def test_depl_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_depl_initial_marginal_and_resume():
    hp = load_fixture("depl")["hparams"]
    q = initial_qhat(hp["num_classes"], hp["patch"])
    assert q.shape == (1, hp["num_classes"], *hp["patch"]) and torch.allclose(q.sum(1), torch.ones(1))
    state, restored = resume_pair(METHOD)
    assert torch.equal(state.qhat_a, restored.qhat_a) and torch.equal(state.qhat_b, restored.qhat_b)
