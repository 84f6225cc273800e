"""Helpers of the DHC replay tests: load a fixture of tests/fixtures/dhc, build its networks, compare states.

The fixtures (README beside them) were recorded by tools/record_dhc_fixtures.py from DHC's own training
loops in float64. Tolerances (the issue's): every loss term to 1e-10 relative; every tensor of every
state to 1e-11 relative after iteration 1 and 1e-8 after iteration 2, relative meaning
max|ours − theirs| / max|theirs| per tensor (integer buffers exactly).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from skcdf.methods.common import DHCVNet, dhc_to_skcdf_key, from_dhc_state_dict

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "dhc"
LOSS_TOLERANCE = 1e-10
STATE_TOLERANCE = (1e-11, 1e-8)


def load_fixture(method: str) -> dict:
    return torch.load(FIXTURES / f"{method}.pt", weights_only=True)


def build_net(fixture: dict, name: str) -> DHCVNet:
    """The fixture's network ``name`` in float64, loaded with its initial state."""
    args = fixture["model_args"]
    net = DHCVNet(args["n_channels"], args["n_classes"], args["n_filters"], dropout=args["has_dropout"]).double()
    return from_dhc_state_dict(net, fixture["state0"][name])


def sgd(net: torch.nn.Module, fixture: dict) -> torch.optim.SGD:
    hp = fixture["hparams"]
    return torch.optim.SGD(net.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                           nesterov=hp["nesterov"])


def inputs(fixture: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_l (b, 1, D, H, W) float64, y_l (b, D, H, W) int64, x_u (b, 1, D, H, W) float64)."""
    data = fixture["inputs"]
    return data["image_l"].double(), data["label_l"].long(), data["image_u"].double()


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-300))


def assert_state_matches(net: torch.nn.Module, reference: dict[str, torch.Tensor], tolerance: float, what: str,
                         key_map: Callable[[str], str] = dhc_to_skcdf_key) -> None:
    """``key_map`` maps a DHC state-dict key to ``net``'s (default: plain VNet)."""
    ours = net.state_dict()
    assert len(ours) == len(reference), what
    for key, value in reference.items():
        mine = ours[key_map(key)]
        if value.is_floating_point():
            assert relative_difference(mine, value) <= tolerance, f"{what}: {key}"
        else:
            assert torch.equal(mine.cpu(), value), f"{what}: {key}"


def assert_losses_match(ours: dict[str, float], reference: dict[str, float], what: str, names: dict[str, str]) -> None:
    """``names`` maps each fixture loss key to the step's key."""
    assert set(names) == set(reference), what
    for theirs_name, our_name in names.items():
        assert ours[our_name] == pytest.approx(reference[theirs_name], rel=LOSS_TOLERANCE, abs=0), f"{what}: {theirs_name}"
