"""GenericSSL equals xmed-lab/GenericSSL's ``code/train_diffusion.py``: its strong augmentation and two recorded
float64 iterations of its loop replayed (tests/fixtures/genericssl/genericssl.pt, recorded by
tools/record_genericssl_fixture.py; README beside it).

Injected: every Dropout3d mask (p = 0.1 and p = 0.5, each in call order), the diffusion times, the diffusion noise,
DDIM's starting noise, the Gumbel draws and every draw of the augmentation. Tolerances as for DHC's methods
(tests/methods/replay.py): losses to 1e-10 relative, every tensor to 1e-11 after iteration 1 and 1e-8 after 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from skcdf.methods.dhc import DiffDW
from skcdf.methods.genericssl import (Draws, GenericSSLConfig, GenericSSLNet, GenericSSLState, from_genericssl_state_dict,
                                      genericssl_step, strong_augment)
from tests.methods.replay import LOSS_TOLERANCE, STATE_TOLERANCE, relative_difference, through_file

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "genericssl" / "genericssl.pt"


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)


class ReplayAugmentDraws:
    """The augmentation's recorded draws, in order; each call must ask for the recorded kind and bounds."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = list(log)

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        kind, recorded_low, recorded_high, value = self.log.pop(0)
        assert (kind, recorded_low, recorded_high) == ("uniform", low, high)
        return value

    def sample(self, n: int, k: int) -> list[int]:
        kind, recorded_n, recorded_k, chosen = self.log.pop(0)
        assert (kind, recorded_n, recorded_k) == ("sample", n, k)
        return list(chosen)


def test_the_strong_augmentation_equals_the_codes_bit_for_bit(fixture):
    """Each sample of both iterations: the code's random crop (recorded offsets), then skcdf's
    :func:`strong_augment` with the recorded draws gives the code's image and label exactly."""
    raw, patch, batch = fixture["raw"], fixture["hparams"]["patch"], fixture["hparams"]["batch"]
    chosen = set()
    for iteration in fixture["augmentation"]:
        for j, (crop, log) in enumerate(zip(iteration["crop"], iteration["draws"])):
            kind, i = ("l", j) if j < batch else ("u", j - batch)
            window = tuple(slice(c, c + n) for c, n in zip(crop, patch))
            label = raw["label_l"][i][window].numpy().astype(np.int64) if kind == "l" else None
            draws = ReplayAugmentDraws(log)
            chosen.update(log[0][3])
            image, label = strong_augment(raw[f"image_{kind}"][i][window].numpy()[None], label, draws)
            assert not draws.log
            assert np.array_equal(image, iteration[f"image_{kind}"][i].numpy()), (kind, i)
            if kind == "l":
                assert np.array_equal(label, iteration["label_l"][i].numpy()), i
    assert chosen == set(range(6))  # every transform was drawn somewhere


def _start(fixture: dict) -> tuple[GenericSSLNet, torch.optim.Optimizer, GenericSSLState, GenericSSLConfig]:
    args, hp = fixture["model_args"], fixture["hparams"]
    net = GenericSSLNet(args["n_channels"], args["n_classes"], args["n_filters"], dropout=args["has_dropout"],
                        time_dim=args["time_dim"]).double()
    from_genericssl_state_dict(net, fixture["state0"])
    optimizer = torch.optim.SGD(net.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                                nesterov=hp["nesterov"])
    difficulty = DiffDW(args["n_classes"], hp["accumulate_iters"], dtype=torch.float64, normalise=False)
    config = GenericSSLConfig(weight=hp["mu_max"], max_epoch=hp["max_epoch"], rampup=hp["mu_rampup"], ema_w=hp["ema_w"],
                              accumulate_iters=hp["accumulate_iters"])
    return net, optimizer, GenericSSLState(difficulty), config


def _iteration(fixture: dict, i: int, net: GenericSSLNet, optimizer: torch.optim.Optimizer, state: GenericSSLState,
               config: GenericSSLConfig) -> dict[str, Any]:
    """Iteration ``i`` (0-based) on the code's augmented batches with every recorded draw."""
    recorded = fixture["draws"][i]
    normals = [recorded["normal"][0], recorded["ddim"][0]]  # the diffusion's ε, then DDIM's start

    def normal(like: torch.Tensor) -> torch.Tensor:
        drawn = normals.pop(0)
        assert drawn.shape == like.shape
        return drawn.to(like.dtype)

    def timesteps(n: int, steps: int, device: torch.device) -> torch.Tensor:
        assert (n, steps) == (len(recorded["timesteps"][0]), 1000)
        return recorded["timesteps"][0]

    draws = Draws(timesteps=timesteps, normal=normal, gumbel=lambda like: -recorded["gumbel"][0].to(like.dtype).log())
    net.dropout_stage.replay(recorded["dropout"]["0.1"])
    net.dropout.replay(recorded["dropout"]["0.5"])
    batches = fixture["augmentation"][i]
    terms = genericssl_step(net, optimizer, state, batches["image_l"].double(), batches["label_l"].long(),
                            batches["image_u"].double(), fixture["hparams"]["epoch"], config, draws, augment=False)
    assert not normals and net.dropout_stage.pending == 0 and net.dropout.pending == 0
    return terms


def _assert_state_matches(net: GenericSSLNet, fixture: dict, i: int) -> None:
    """Every tensor of ours against the code's; the parameters it never uses did not move there."""
    ours, theirs = net.state_dict(), fixture[f"state{i + 1}"]
    for key, value in theirs.items():
        if key not in ours:
            assert torch.equal(value, fixture["state0"][key].to(value.dtype)), key
        elif value.is_floating_point():
            assert relative_difference(ours[key], value) <= STATE_TOLERANCE[i], f"{key} after iteration {i + 1}"
        else:
            assert torch.equal(ours[key], value), key


def test_genericssl_replays_two_iterations_of_train_diffusion(fixture):
    net, optimizer, state, config = _start(fixture)
    hp = fixture["hparams"]
    for i in range(2):
        terms = _iteration(fixture, i, net, optimizer, state, config)
        what = f"iteration {i + 1}"
        assert terms["mu"] == pytest.approx(hp["mu"], rel=1e-15)
        for name, value in fixture["losses"][i].items():
            assert terms[name] == pytest.approx(value, rel=LOSS_TOLERANCE, abs=0), f"{what}: {name}"
        assert relative_difference(terms["weights"], fixture["weights"][i]) <= LOSS_TOLERANCE, what
        for key, value in fixture["difficulty"][i].items():
            assert relative_difference(getattr(state.difficulty, key), value) <= LOSS_TOLERANCE, f"{what}: {key}"
        assert torch.equal(terms["pseudo_labels"].to(torch.uint8), fixture["pseudo_label"][i]), what
        _assert_state_matches(net, fixture, i)


def test_genericssl_resumes_bit_exactly(fixture):
    """Network, optimiser and statistics saved after iteration 1 (through a file, ``weights_only``) and restored
    into fresh objects: iteration 2 gives the same bits."""
    net, optimizer, state, config = _start(fixture)
    _iteration(fixture, 0, net, optimizer, state, config)
    saved = through_file(net, optimizer, state)
    other, other_optimizer, restored, _ = _start(fixture)
    other.load_state_dict(saved["net"])
    other_optimizer.load_state_dict(saved["optimizer"])
    restored.load_state_dict(saved["state"])
    terms = [_iteration(fixture, 1, *run, config) for run in ((net, optimizer, state), (other, other_optimizer, restored))]
    assert terms[0]["total"] == terms[1]["total"]
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(state.state_dict()["difficulty"].values(),
                                                 restored.state_dict()["difficulty"].values()))
