"""Shared test set-up: one torch thread per test process, a tiny phantom data set made once per
session, training configurations sized for it, and a run folder holding a tiny random model."""

import json
from pathlib import Path

import pytest
import torch

from skcdf.checkpoint import save_checkpoint
from skcdf.data.phantom import generate_phantom
from skcdf.nn import SKCDFNet
from skcdf.train.config import load_config
from tests.scans import NET_PREPROCESSING, NUM_CLASSES

# `make test` runs two pytest-xdist workers on two cores; with torch's default thread count each
# worker oversubscribes the cores, which made small models 10-20x slower.
torch.set_num_threads(1)

# 8 cases of 32x48x48 -> train 5 (2 labeled, 3 unlabeled at 40 %), eval 1, test 2.
TINY_SETTINGS = {
    "patch_size": [32, 32, 32], "filters": 2, "labeled_split": "labeled_40p", "unlabeled_split": "unlabeled_40p",
    "batch_labeled": 2, "batch_unlabeled": 2, "iterations_per_epoch": 2, "epochs": 2, "val_every": 1,
    "save_every": 1, "log_every": 1, "num_workers": 0, "device": "cpu",
}


def tiny_config(**overrides) -> dict:
    """The phantom preset shrunk to the tiny data set, with ``overrides`` passed like --set."""
    settings = {**TINY_SETTINGS, **overrides}
    return load_config("phantom", [f"{key}={json.dumps(value)}" for key, value in settings.items()])


@pytest.fixture(scope="session")
def tiny_phantom(tmp_path_factory) -> Path:
    return generate_phantom(tmp_path_factory.mktemp("data") / "phantom", cases=8, shape=(32, 48, 48),
                            labeled_percent=40, workers=1)


@pytest.fixture
def run_folder(tmp_path):
    """A run folder whose best.pt holds a tiny random SKCDFNet, and that model (eval mode)."""
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=NUM_CLASSES, filters=2, patch_size=NET_PREPROCESSING["patch_size"]).eval()
    names = ["background", "liver", "spleen"]
    save_checkpoint(tmp_path / "run" / "best.pt", {
        "format": "skcdf-checkpoint", "model_args": model.init_args, "model": model.state_dict(),
        "preprocessing": {**NET_PREPROCESSING, "class_names": names, "class_abbrevs": ["BG", "Li", "Sp"]},
    })
    return tmp_path / "run", model
