"""Where training patches are cut: uniformly (the reference), or a share of them centred on foreground.

``uniform``: the patch start is uniform over the positions where the patch fits (a volume smaller
than the patch along an axis lies uniformly anywhere in it, padded, :func:`skcdf.data.loaders.crop_region`).
``foreground`` (nnU-Net's ``oversample_foreground_percent``): with probability ``foreground_share``
the patch is centred on a voxel drawn uniformly from the case's foreground voxels (every label > 0);
``class``: the class is drawn first, class c with probability proportional to ``n_c ** -power`` over
the classes present in the case (n_c: its voxels over all the stream's cases; power 0: every class
alike, 1: inverse frequency, so rare organs are seen as often as the liver), then one of its voxels.
Where the volume is too small to centre the patch on it, the patch is moved inside the volume and
still contains the voxel; along an axis where the volume is smaller than the patch, the volume is placed
so that the voxel is as near the patch's centre as the patch allows.

Per case and class up to :data:`MAX_LOCATIONS` voxel positions are kept (nnU-Net's 10,000), drawn
once by a generator seeded with the case's index. All draws during training come from the torch
generator the item is given, after the uniform start and the flips, so that ``uniform`` draws
exactly what it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

SAMPLING_MODES = ("uniform", "foreground", "class")
MAX_LOCATIONS = 10_000


@dataclass(frozen=True)
class PatchSampling:
    """How training patches are placed: ``mode`` (:data:`SAMPLING_MODES`), the share of patches
    centred on foreground, and the power of the class weights of ``class`` mode."""

    mode: str = "uniform"
    foreground_share: float = 0.33
    class_power: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"patch sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.mode!r}")
        if not 0.0 <= self.foreground_share <= 1.0:
            raise ValueError(f"foreground_share must lie in [0, 1], got {self.foreground_share}")


@dataclass(frozen=True)
class ClassLocations:
    """One case's voxels by class: ``counts`` (K,) voxels per class, ``voxels[c]`` flat indices of up to
    :data:`MAX_LOCATIONS` of class c's voxels (int64, empty for an absent class)."""

    counts: np.ndarray
    voxels: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, label: np.ndarray, num_classes: int, seed: int) -> "ClassLocations":
        """The locations of ``label`` (D, H, W) integer 0..num_classes-1; ``seed`` draws the kept subset."""
        flat = np.asarray(label).ravel()
        counts = np.bincount(flat, minlength=num_classes)[:num_classes]
        order = np.argsort(flat, kind="stable")  # voxel indices grouped by class (radix sort for small ints)
        rng = np.random.default_rng(seed)
        voxels, start = [], 0
        for count in counts:
            members = order[start:start + count]
            start += count
            voxels.append(members if count <= MAX_LOCATIONS else rng.choice(members, MAX_LOCATIONS, replace=False))
        return cls(counts.astype(np.int64), tuple(voxels))


def class_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """``class`` mode's weights (K,): ``n_c ** -power`` for every foreground class with voxels, 0 otherwise."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    present[0] = False
    weights[present] = counts[present] ** -power
    return weights


class PatchSampler:
    """Draws patch starts for the cases of one dataset (see the module doc).

    Args:
        sampling: the mode and its parameters.
        labels: each case's label map (D, H, W); needed unless ``mode`` is ``uniform``.
    """

    def __init__(self, sampling: PatchSampling, labels: Sequence[np.ndarray] = ()) -> None:
        self.sampling = sampling
        self.locations: list[ClassLocations] = []
        self.weights = np.zeros(0)
        if sampling.mode == "uniform":
            return
        if not labels:
            raise ValueError(f"patch sampling {sampling.mode!r} needs the cases' labels")
        num_classes = 1 + max(int(np.max(label)) for label in labels)
        self.locations = [ClassLocations.of(label, num_classes, seed) for seed, label in enumerate(labels)]
        self.weights = class_weights(sum(loc.counts for loc in self.locations), sampling.class_power)

    def class_probabilities(self, index: int) -> np.ndarray:
        """(K,) probability that a foreground-centred patch of case ``index`` is centred on each class."""
        counts = self.locations[index].counts.astype(np.float64)
        if self.sampling.mode == "foreground":
            weights = counts.copy()
            weights[0] = 0.0
        else:
            weights = self.weights * (counts > 0)
        total = weights.sum()
        return weights / total if total > 0 else weights

    def centre(self, index: int, shape: Sequence[int], generator: torch.Generator | None) -> tuple[int, ...] | None:
        """A voxel (D, H, W index) to centre case ``index``'s patch on, or None for a uniform patch:
        drawn with probability ``foreground_share`` (never in ``uniform`` mode, or for a case without foreground)."""
        if self.sampling.mode == "uniform":
            return None
        forced = bool(torch.rand((), generator=generator) < self.sampling.foreground_share)
        probabilities = self.class_probabilities(index)
        if not forced or probabilities.sum() == 0:
            return None
        label = int(torch.multinomial(torch.from_numpy(probabilities), 1, generator=generator))
        voxels = self.locations[index].voxels[label]
        flat = voxels[int(torch.randint(len(voxels), (), generator=generator))]
        return tuple(int(i) for i in np.unravel_index(flat, tuple(shape)))


def start_range(size: int, patch: int) -> tuple[int, int]:
    """The lowest and highest start of a patch along an axis of ``size`` voxels: below 0 where the volume is
    smaller than the patch, placing it ``-start`` voxels in (:func:`skcdf.data.loaders.crop_region`)."""
    return min(size - patch, 0), max(size - patch, 0)


def centred_starts(centre: Sequence[int], shape: Sequence[int], patch_size: Sequence[int]) -> list[int]:
    """Patch starts that centre ``patch_size`` on ``centre`` as far as the volume ``shape`` allows."""
    starts = []
    for c, size, p in zip(centre, shape, patch_size):
        low, high = start_range(size, p)
        starts.append(min(max(c - p // 2, low), high))
    return starts
