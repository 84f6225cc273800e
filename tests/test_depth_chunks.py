"""The sliding window a chunk of slices at a time gives the whole-volume sliding window's probabilities,
and whole-scan prediction through it the labels of the whole-volume path."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from skcdf.data.back_to_scan import labels_in_original_space
from skcdf.data.geometry import Geometry, resample_to_size
from skcdf.data.spacing import network_size
from skcdf.depth_chunks import DepthChunks, window_starts
from skcdf.infer import InferenceSettings, depth_window, predict_scan, volume_probabilities
from skcdf.nn import SKCDFNet
from tests.scans import WINDOW

PATCH = [32, 32, 32]
SETTINGS = InferenceSettings(stride=(16, 16, 16))


@pytest.fixture(scope="module")
def model() -> SKCDFNet:
    torch.manual_seed(0)
    return SKCDFNet(num_classes=3, filters=2, patch_size=tuple(PATCH)).eval()


def test_window_starts_are_those_of_the_sliding_window():
    assert window_starts(150, 32, 16) == [0, 16, 32, 48, 64, 80, 96, 112, 118]
    assert window_starts(32, 32, 16) == [0] and window_starts(20, 32, 16) == [0]


def test_chunks_give_the_whole_volume_probabilities(model):
    image = np.random.default_rng(0).uniform(-200, 300, (150, 40, 36)).astype(np.float32)
    preprocessing = {"window": WINDOW, "patch_size": PATCH}
    whole = volume_probabilities(model, image, preprocessing, SETTINGS).numpy()
    calls = []

    def window(a: int, b: int) -> torch.Tensor:
        calls.append((a, b))
        return depth_window(model, image, preprocessing, SETTINGS)(a, b)

    chunks = DepthChunks(window, image.shape, 32, 16, chunk_steps=2)  # chunks of 32 slices: 5 of them
    for low, high in [(0, 10), (5, 40), (33, 70), (69, 120), (100, 150)]:  # overlapping, in order
        np.testing.assert_allclose(chunks.slab(low, high), whole[:, low:high], atol=1e-6)
    # each chunk's window covers its 32 slices and the windows that reach into them: at most a patch either side
    assert len(calls) == 5 and calls[0] == (0, 48) and all(b - a <= 32 + 2 * 32 for a, b in calls)
    with pytest.raises(ValueError, match="read slabs in order"):
        chunks.slab(0, 10)


class _ConvToy(torch.nn.Module):
    """One random 5×5×5 convolution, zero-padded at each window's border: labels that vary from voxel to
    voxel and depend on which windows cover them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = torch.nn.Conv3d(1, 3, 5, padding=2)

    def forward(self, x: torch.Tensor, flow: str = "unlabeled") -> tuple[torch.Tensor, None]:
        return 20 * self.conv(x), None


def test_whole_scan_prediction_through_chunks_equals_the_whole_volume_path():
    """A 2 mm model on a 1 mm scan 300 slices long: a 150-deep network grid, two chunks at the default size."""
    model = _ConvToy().eval()
    scan = sitk.GetImageFromArray(np.random.default_rng(1).uniform(-200, 300, (300, 36, 30)).astype(np.int16))
    scan.SetSpacing((1.0, 1.0, 1.0))
    preprocessing = {"size": None, "spacing": [2.0, 2.0, 2.0], "window": WINDOW, "patch_size": PATCH}
    size = network_size(Geometry.of_image(scan), preprocessing)
    assert size[0] > 128  # deeper than one chunk (CHUNK_STEPS x 16 slices)
    network_input = sitk.GetArrayFromImage(resample_to_size(scan, size, is_label=False))
    whole = volume_probabilities(model, network_input, preprocessing, SETTINGS).numpy()
    expected = labels_in_original_space(whole, Geometry.of_image(scan))
    labels = predict_scan(model, scan, preprocessing, SETTINGS).labels
    assert labels.shape == (300, 36, 30) and len(np.unique(expected)) > 1
    assert np.mean(labels == expected) > 0.9999  # equal up to float rounding at near-ties
