"""Labels back on the scan's own grid: class probabilities on the network grid, resampled linearly
onto the scan one slab of slices at a time, then the argmax.

The network grid covers the scan's box with the same direction (:func:`skcdf.data.geometry.prepared_grid`),
so slices ``z0..z1`` of the scan need only the network slices around them. Per slab each class is
resampled in turn and a running maximum kept, so memory holds a few slabs of the scan's size, not K
volumes of it (nor two: 1.3 GB for a 512×512×600 scan before, ~70 MB now with 32-slice slabs).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import SimpleITK as sitk

from skcdf.data.geometry import Geometry, place, prepared_grid

#: Scan slices resampled at once.
SLAB = 32
#: Network slices read beyond those a slab's points fall between (linear interpolation needs one).
_MARGIN = 2


def slab_of(grid: Geometry, start: int, stop: int) -> Geometry:
    """Slices ``start..stop-1`` of ``grid`` (index z, array axis D) as a grid of their own."""
    direction = np.array(grid.direction).reshape(3, 3)
    origin = np.array(grid.origin) + direction[:, 2] * start * grid.spacing[2]
    return Geometry((grid.size[0], grid.size[1], stop - start), grid.spacing, tuple(origin.tolist()),
                    grid.direction, grid.source)


def _linear(image: sitk.Image, grid: Geometry) -> np.ndarray:
    """``image`` resampled linearly onto ``grid``: float32 (D, H, W); points outside it (a rounding error
    beyond the box) take 0."""
    resampled = sitk.Resample(image, grid.size, sitk.Transform(), sitk.sitkLinear, grid.origin, grid.spacing,
                              grid.direction, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


class NetworkSlabs(Protocol):
    """Probabilities on the network grid read in slabs along depth, in increasing order
    (:class:`skcdf.depth_chunks.DepthChunks` computes them as they are read)."""

    shape: tuple[int, ...]  # ends with the network grid (d, h, w)

    def slab(self, low: int, high: int) -> np.ndarray:
        """``(K, high - low, h, w)`` probabilities of network slices ``low..high-1``."""


class _InMemory:
    """A whole ``(K, d, h, w)`` array read as :class:`NetworkSlabs`."""

    def __init__(self, probabilities: np.ndarray) -> None:
        self.probabilities, self.shape = probabilities, probabilities.shape

    def slab(self, low: int, high: int) -> np.ndarray:
        return self.probabilities[:, low:high]


def labels_in_original_space(probabilities: np.ndarray | NetworkSlabs, geometry: Geometry, slab: int = SLAB) -> np.ndarray:
    """Probabilities ``(K, d, h, w)`` (float32 or float16; an array, or read slab by slab) on the network
    grid of ``geometry`` (the grid of that size over the same box) -> argmax labels ``(D, H, W)`` uint8 on
    ``geometry``, the lower class winning ties."""
    source = _InMemory(probabilities) if isinstance(probabilities, np.ndarray) else probabilities
    depth = source.shape[-3]
    network = prepared_grid(geometry, source.shape[-3:])
    labels = np.zeros(tuple(reversed(geometry.size)), np.uint8)
    ratio = depth / geometry.size[2]  # network slices per scan slice
    for z0 in range(0, geometry.size[2], slab):
        z1 = min(z0 + slab, geometry.size[2])
        low = max(0, math.floor((z0 + 0.5) * ratio - 0.5) - _MARGIN)
        high = min(depth, math.ceil((z1 - 0.5) * ratio - 0.5) + 1 + _MARGIN)
        network_slab, target = slab_of(network, low, high), slab_of(geometry, z0, z1)
        best = None
        for label, channel in enumerate(source.slab(low, high)):
            resampled = _linear(place(np.ascontiguousarray(channel, np.float32), network_slab), target)
            if best is None:
                best = resampled
                continue
            better = resampled > best  # strict, so ties keep the lower label like argmax
            np.copyto(best, resampled, where=better)
            labels[z0:z1][better] = label
    return labels
