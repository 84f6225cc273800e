"""UA-MT equals DHC's ``code/train_uamt.py``: two recorded float64 iterations replayed (tests/fixtures/dhc/uamt.pt).

The recorded Gaussian noise (stored in float16, exactly) and every dropout mask of the student and of the
train-mode teacher are injected.
"""

from __future__ import annotations

import pytest
import torch

from skcdf.methods.uamt import UAMTConfig, UAMTState, uamt_step
from tests.methods.replay import (STATE_TOLERANCE, assert_losses_match, assert_state_matches, build_net, inputs,
                                  load_fixture, schedule, sgd)

LOSS_NAMES = {name: name for name in ("loss_ce", "loss_dice", "supervised_loss", "consistency_loss", "total")}


def test_uamt_replays_two_dhc_iterations():
    fixture = load_fixture("uamt")
    hp = fixture["hparams"]
    student, teacher = build_net(fixture, "student"), build_net(fixture, "teacher")
    optimizer = sgd(student, fixture)
    state = UAMTState(teacher)
    config = UAMTConfig(**schedule(hp), ema_decay=hp["ema_decay"], passes=hp["T"], noise_std=hp["noise_std"],
                        noise_clip=hp["noise_clip"])
    epoch = hp["epoch"]
    assert config.weight_at(epoch) == pytest.approx(hp["cps_w"], rel=1e-15)
    assert config.threshold_at(epoch) == pytest.approx(hp["threshold"], rel=1e-15)
    assert config.ema_alpha_at(epoch) == pytest.approx(hp["ema_alpha"], rel=1e-15)
    x_l, y_l, x_u = inputs(fixture)
    for i in range(2):
        draws = fixture["draws"][i]
        student.dropout.replay(draws["dropout"]["student"])
        teacher.dropout.replay(draws["dropout"]["teacher"])
        recorded_noise = list(draws["noise"])

        def noise(x: torch.Tensor) -> torch.Tensor:
            drawn = recorded_noise.pop(0)
            assert drawn.shape == x.shape
            return drawn.to(x.dtype)

        terms = uamt_step(student, optimizer, state, x_l, y_l, x_u, epoch, config, noise=noise)
        assert not recorded_noise and student.dropout.pending == 0 and teacher.dropout.pending == 0
        assert terms["certain_voxels"] == fixture["uncertainty_mask_count"][i]
        assert_losses_match(terms, fixture["losses"][i], f"iteration {i + 1}", LOSS_NAMES)
        assert_state_matches(student, fixture[f"state{i + 1}"]["student"], STATE_TOLERANCE[i],
                             f"student after iteration {i + 1}")
        assert_state_matches(teacher, fixture[f"state{i + 1}"]["teacher"], STATE_TOLERANCE[i],
                             f"teacher after iteration {i + 1}")


def test_uamt_state_round_trip():
    fixture = load_fixture("uamt")
    state = UAMTState(build_net(fixture, "teacher"))
    restored = UAMTState(build_net(fixture, "student"))
    restored.load_state_dict(state.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.teacher.state_dict().values(),
                                                 state.teacher.state_dict().values()))
    assert not any(p.requires_grad for p in restored.teacher.parameters())
