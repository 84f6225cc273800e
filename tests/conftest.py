"""Shared test set-up: one torch thread per test process, a tiny phantom data set made once per
session, training configurations sized for it, a run folder holding a tiny random model, and a real
Orthanc (DICOMweb) server for the PACS tests."""

import json
import os
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


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc with DICOMweb on a free loopback port for the whole session (see tests/orthanc.py);
    skips when Orthanc is not installed, or fails when SKCDF_REQUIRE_ORTHANC is set (CI)."""
    from tests.orthanc import orthanc_missing, start_orthanc

    reason = orthanc_missing()
    if reason:
        if os.environ.get("SKCDF_REQUIRE_ORTHANC"):
            pytest.fail(f"SKCDF_REQUIRE_ORTHANC is set, but {reason}")
        pytest.skip(reason)
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc, monkeypatch, tmp_path):
    """The session's Orthanc, emptied, with the allowed user's credentials in the environment, no
    netrc, and no proxy for the loopback address."""
    from skcdf.dicomweb import ENV_PASSWORD, ENV_TOKEN, ENV_USER
    from tests.orthanc import PASSWORD, USER

    orthanc.clear()
    monkeypatch.setenv(ENV_USER, USER)
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    monkeypatch.delenv(ENV_TOKEN, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    return orthanc
