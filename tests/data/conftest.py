"""Helpers shared by the data tests: small NIfTI volumes and prepared data sets made on the spot."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.data.geometry import Geometry

# A deliberately unusual scan geometry: anisotropic spacing, far-off origin, oblique direction with a flip.
UNUSUAL_SPACING = (0.71, 0.93, 3.3)
UNUSUAL_ORIGIN = (-187.25, 41.5, 612.75)


def unusual_direction() -> tuple[float, ...]:
    angle = np.radians(17)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return tuple((tilt @ np.diag([-1.0, -1.0, 1.0])).ravel())


def write_volume(path: Path, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Sequence[float] | None = None) -> Path:
    """Write a (D, H, W) array as a volume file with the given geometry (format from the suffix)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(spacing))
    image.SetOrigin(tuple(origin))
    image.SetDirection(tuple(direction) if direction is not None else tuple(np.eye(3).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def synthetic_case(rng: np.random.Generator, shape: Sequence[int] = (12, 20, 24),
                   num_classes: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """An image in HU (float32) and a label map of random boxes (uint8) with every class present."""
    image = rng.normal(40, 30, shape).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for value in range(1, num_classes):
        corner = [rng.integers(0, n - 2) for n in shape]
        label[tuple(slice(c, c + 2) for c in corner)] = value
    image[label > 0] += 60
    return image, label


def geometry_of(path: Path) -> Geometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                    tuple(reader.GetDirection()))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
