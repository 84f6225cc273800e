"""Small synthetic scans and inference settings shared by the inference, DICOM, segmenter and export
tests (the ``run_folder`` fixture built on them lives in conftest.py)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

PATCH = (16, 32, 32)
NUM_CLASSES = 3
WINDOW = [-75.0, 275.0]
PREPROCESSING = {"size": list(PATCH), "window": WINDOW, "patch_size": list(PATCH)}
BOX = (slice(6, 18), slice(10, 30), slice(8, 22))
# The SKCM needs every patch side divisible by 32; the training size spans 2×2 windows in-plane.
NET_PREPROCESSING = {"size": [32, 48, 40], "window": WINDOW, "patch_size": [32, 32, 32]}


class ThresholdToy(nn.Module):
    """Class 1 wherever the windowed, scaled intensity exceeds 0.5: segments bright objects exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.steepness = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor, flow: str = "unlabeled") -> tuple[torch.Tensor, None]:
        return torch.cat([torch.zeros_like(x), self.steepness * (x - 0.5)], dim=1), None


def rotation(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    """A direction cosine matrix (row-major 9-tuple): rotation about z, then about x."""
    z, x = np.radians(degrees_z), np.radians(degrees_x)
    about_z = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return tuple((about_z @ about_x).ravel())


def box_scan(shape=(24, 40, 30)) -> sitk.Image:
    """Air (-1000 HU) with a soft-tissue box (200 HU) at BOX, on an oblique grid with anisotropic spacing."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[BOX] = 200.0
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((12.5, -30.0, 48.0))
    image.SetDirection(rotation(30, 20))
    return image
