"""Voxel grids in physical space, and resampling a scan between its own grid and the prepared one.

Resampling keeps the scan's physical extent: the prepared grid covers exactly the same box (voxel
edges to voxel edges) with the same direction, only with fewer or more voxels. This is what the
reference implementation's ``F.interpolate(..., align_corners=False)`` does in index space, and it
lets a prediction be resampled back onto the original scan (:func:`to_original_space`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from skcdf.utils import InputError


@dataclass(frozen=True)
class Geometry:
    """Where a scan's voxels lie in physical space, in SimpleITK's (x, y, z) order.

    ``physical = origin + direction @ (index * spacing)``, with ``direction`` a row-major 3×3 matrix.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str | None = None

    @classmethod
    def of_image(cls, image: "sitk.Image", source: str | os.PathLike | None = None) -> "Geometry":
        return cls(
            size=tuple(int(n) for n in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
            source=None if source is None else str(source),
        )

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "source": self.source}

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "Geometry":
        try:
            geometry = cls(
                size=tuple(int(n) for n in data["size"]),
                spacing=tuple(float(s) for s in data["spacing"]),
                origin=tuple(float(o) for o in data["origin"]),
                direction=tuple(float(d) for d in data["direction"]),
                source=data.get("source"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: not a geometry file (needs size, spacing, origin, direction): {exc!r}") from None
        lengths = tuple(map(len, (geometry.size, geometry.spacing, geometry.origin, geometry.direction)))
        if lengths != (3, 3, 3, 9):
            raise InputError(f"{path}: geometry must have 3 sizes, spacings and origin values and 9 direction values")
        return geometry

    def mismatch(self, other: "Geometry") -> str | None:
        """How ``other``'s voxel grid differs from this one (None if they agree to float precision)."""
        if self.size != other.size:
            return f"size {other.size} differs from {self.size}"
        for name, atol in (("spacing", 1e-4), ("origin", 1e-3), ("direction", 1e-4)):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not np.allclose(mine, theirs, rtol=1e-4, atol=atol):
                return f"{name} {_rounded(theirs)} differs from {_rounded(mine)}"
        return None


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in values)


def prepared_grid(geometry: Geometry, size_dhw: Sequence[int]) -> Geometry:
    """The grid of ``size_dhw`` (D, H, W) voxels covering the same physical box as ``geometry``.

    The spacing grows by the size ratio, and the origin (a voxel centre) moves by half the change of
    spacing along each axis so that the outer voxel edges stay in place.
    """
    size = tuple(int(n) for n in reversed(size_dhw))
    old_spacing = np.array(geometry.spacing)
    spacing = old_spacing * np.array(geometry.size) / np.array(size)
    direction = np.array(geometry.direction).reshape(3, 3)
    origin = np.array(geometry.origin) + direction @ ((spacing - old_spacing) / 2)
    return Geometry(size, tuple(spacing.tolist()), tuple(origin.tolist()), geometry.direction, geometry.source)


def _resample(image: sitk.Image, grid: Geometry, is_label: bool) -> sitk.Image:
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(grid.size)
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    if is_label:
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetOutputPixelType(sitk.sitkUInt8)
    else:
        resampler.SetInterpolator(sitk.sitkLinear)
        resampler.SetOutputPixelType(sitk.sitkFloat32)
        # Only points a rounding error outside the box can miss the scan; give them the scan's lowest value.
        resampler.SetDefaultPixelValue(float(sitk.GetArrayViewFromImage(image).min()))
    return resampler.Execute(image)


def resample_to_size(image: sitk.Image, size_dhw: Sequence[int], is_label: bool) -> sitk.Image:
    """Resample to ``size_dhw`` (D, H, W) voxels over the same physical extent.

    Images are interpolated trilinearly into Float32, labels by nearest neighbour into UInt8.
    """
    return _resample(image, prepared_grid(Geometry.of_image(image), size_dhw), is_label)


def to_original_space(volume: np.ndarray, geometry: Geometry, is_label: bool = True) -> sitk.Image:
    """Put a prepared (D, H, W) volume back onto the original scan's grid described by ``geometry``.

    The inverse of :func:`resample_to_size`: nearest neighbour for labels (UInt8), linear otherwise.
    """
    return _resample(place(np.ascontiguousarray(volume), prepared_grid(geometry, volume.shape)), geometry, is_label)


def place(array: np.ndarray, grid: Geometry) -> sitk.Image:
    """``array`` (D, H, W) as an image on ``grid`` (its size must match)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image
