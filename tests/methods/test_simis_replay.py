"""SimiS equals DHC's ``code/train_simis.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/simis.pt)."""

from __future__ import annotations

import numpy as np
import torch

from skcdf.methods.simis import SimiSConfig, SimiSState, SimiSWeights, simis_gaps, simis_step
from tests.methods.replay import build_net, class_weight_replay, replay_pair, resume_pair, schedule, sgd


def start(fixture: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, SimiSState, SimiSConfig]:
    hp = fixture["hparams"]
    counts = fixture["labeled_class_counts"].numpy()
    net_a, net_b = build_net(fixture, "A"), build_net(fixture, "B")
    weights = [SimiSWeights(counts, hp["simis_momentum"], dtype=torch.float64) for _ in range(2)]
    state = SimiSState(net_b, sgd(net_b, fixture), *weights)
    config = SimiSConfig(**schedule(hp), momentum=hp["simis_momentum"])
    return net_a, sgd(net_a, fixture), state, config


def test_simis_gaps():
    gaps = simis_gaps(np.array([6.0, 3.0, 1.0, 0.0]))
    np.testing.assert_allclose(gaps, [0.0, 0.3, 0.5, 0.6], rtol=1e-8, atol=1e-8)
    weights = SimiSWeights(np.array([6.0, 3.0, 1.0, 0.0]), momentum=0.99, dtype=torch.float64)
    torch.testing.assert_close(weights.weights, 0.99 * 4 + 0.01 * 4 * torch.tensor(gaps), rtol=1e-15, atol=0)


METHOD = class_weight_replay("simis", start, simis_step, "simis_weights0")


def test_simis_replays_two_dhc_iterations():
    replay_pair(METHOD)


def test_simis_resumes_from_saved_state():
    state, restored = resume_pair(METHOD)
    assert torch.equal(state.weights_a.weights, restored.weights_a.weights)
