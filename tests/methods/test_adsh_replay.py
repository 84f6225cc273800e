"""Adsh equals DHC's ``code/train_adsh.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/adsh.pt)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skcdf.methods.adsh import AdshBank, AdshConfig, AdshState, adsh_step
from tests.methods.replay import (LOSS_TOLERANCE, PairReplay, build_net, relative_difference, replay_pair, resume_pair,
                                  schedule, sgd)


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
    config = AdshConfig(**schedule(hp), thresh_major=hp["thresh_major"])
    return net_a, sgd(net_a, fixture), state, config


def check(fixture: dict, i: int, state: AdshState, terms: dict) -> None:
    """Iteration 1 stores its unlabeled softmax in the banks, iteration 2 recomputes the thresholds."""
    for name, bank in (("A", state.bank_a), ("B", state.bank_b)):
        reference = fixture["adsh"][i][name]
        assert bank.count == reference["cur_iter"]
        assert relative_difference(bank.thresholds, reference["thresholds"]) <= LOSS_TOLERANCE
        assert terms[f"map_{name}"] == reference["sample_map_count"].tolist()


METHOD = PairReplay("adsh", start, adsh_step, check=check)


def test_adsh_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_adsh_resumes_from_saved_state():
    def fresh(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, AdshState, AdshConfig]:
        net_a, optimizer_a, state, config = start(fixture)
        state.bank_a = AdshBank(1, (1,), 1)  # load_state_dict restores the sizes too
        return net_a, optimizer_a, state, config

    state, restored = resume_pair(METHOD, fresh)
    for a, b in ((state.bank_a, restored.bank_a), (state.bank_b, restored.bank_b)):
        assert torch.equal(a.thresholds, b.thresholds) and torch.equal(a.scores, b.scores) and a.count == b.count
