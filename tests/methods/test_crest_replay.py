"""CReST equals DHC's ``code/train_crest.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/crest.pt)."""

from __future__ import annotations

import numpy as np
import torch

from skcdf.methods.crest import CReSTConfig, CReSTState, CReSTWeights, crest_rates, crest_step
from tests.methods.replay import build_net, class_weight_replay, replay_pair, resume_pair, schedule, sgd


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, CReSTState, CReSTConfig]:
    hp = fixture["hparams"]
    counts = fixture["labeled_class_counts"].numpy()
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    weights = [CReSTWeights(counts, hp["crest_momentum"], dtype=torch.float64) for _ in range(2)]
    state = CReSTState(net_b, sgd(net_b, fixture), *weights)
    config = CReSTConfig(**schedule(hp), momentum=hp["crest_momentum"])
    return net_a, sgd(net_a, fixture), state, config


def test_crest_rates_reverse_the_ranking():
    rates = crest_rates(np.array([1000.0, 8.0, 125.0, 0.0]))
    mu = np.array([1.0, 0.2, 0.5, (1e-8 / (1000 + 1e-8)) ** (1 / 3)])
    np.testing.assert_allclose(rates, [mu[3], mu[2], mu[1], mu[0]], rtol=1e-8)  # the 1e-8 smoothing
    ties = crest_rates(np.array([0.0, 5.0, 0.0], dtype=np.float32))  # stable: tied classes keep their order
    assert ties[2] == 1.0 and ties[0] == ties[1] < 1e-2


METHOD = class_weight_replay("crest", start, crest_step, "crest_weights0")


def test_crest_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_crest_resumes_from_saved_state():
    state, restored = resume_pair(METHOD)
    assert torch.equal(state.weights_a.weights, restored.weights_a.weights)
