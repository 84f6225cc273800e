"""CLD equals DHC's ``code/train_cld.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/cld.pt).
The dropout masks and the sampling maps' uniforms are injected; iteration 1 completes a bank period."""

from __future__ import annotations

import numpy as np
import torch

from skcdf.methods.cld import CLDConfig, CLDState, ConfidenceBank, cld_class_weights, cld_step
from tests.methods.replay import (LOSS_TOLERANCE, PairReplay, build_net, load_fixture, relative_difference, replay_pair,
                                  resume_pair, schedule, sgd)


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, CLDState, CLDConfig]:
    hp = fixture["hparams"]
    config = CLDConfig(**schedule(hp),
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


def uniforms(fixture: dict, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The recorded per-voxel draws of iteration ``i``'s sampling maps, as ``cld_step``'s keyword."""
    return {"uniforms": tuple(fixture["sampling_uniform"][i][name].double() for name in ("A", "B"))}


def check(fixture: dict, i: int, state: CLDState, terms: dict) -> None:
    for name, bank in (("A", state.bank_a), ("B", state.bank_b)):
        reference = fixture["banks"][i][name]
        assert terms[f"map_{name}"] == fixture["sample_map_sum"][i][name]
        assert bank.batches == reference["tot_iter"]
        assert relative_difference(bank.confs, reference["confs"]) <= LOSS_TOLERANCE
        assert relative_difference(bank.conf_sum, reference["confs_all"]) <= LOSS_TOLERANCE
        assert torch.equal(bank.count, reference["confs_cnt"])


METHOD = PairReplay("cld", start, cld_step, step_kwargs=uniforms, check=check)


def test_cld_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_cld_resumes_from_saved_state():
    state, restored = resume_pair(METHOD)
    assert torch.equal(state.bank_a.confs, restored.bank_a.confs)
