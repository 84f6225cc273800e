"""Intensity normalisation: the reference's per-volume min-max, or nnU-Net's data-set statistics.

``minmax`` (the paper's, every preset's): clip to the CT window (none for MRI), then map the volume's
own (min, max) onto [0, 1]. ``dataset`` (nnU-Net's ``CTNormalization``): clip to the 0.5 and 99.5
percentiles of the training set's foreground intensities, then subtract their mean and divide by
their standard deviation, the same numbers for every scan. ``skcdf prepare`` records the statistics
in dataset.json (``intensity``); training copies them into the checkpoint, so that prediction applies
exactly what training did.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from skcdf.data.preprocess import intensity_range, scale_intensity
from skcdf.utils import InputError

NORMALIZATIONS = ("minmax", "dataset")
#: The statistics dataset.json's ``intensity`` holds (nnU-Net's names).
INTENSITY_KEYS = ("mean", "std", "percentile_00_5", "percentile_99_5")
#: Foreground intensities kept per case for the statistics (nnU-Net's number).
FOREGROUND_SAMPLES = 10_000


def foreground_sample(image: np.ndarray, label: np.ndarray, key: str) -> np.ndarray:
    """Up to :data:`FOREGROUND_SAMPLES` intensities of the voxels where ``label > 0``, drawn without
    replacement by a generator seeded from ``key`` (the case id), so that the result does not depend
    on which process draws it. image, label: (D, H, W) on one grid. Returns float32 (n,)."""
    values = np.asarray(image)[np.asarray(label) > 0].astype(np.float32)
    if len(values) <= FOREGROUND_SAMPLES:
        return values
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    return values[rng.choice(len(values), FOREGROUND_SAMPLES, replace=False)]


def intensity_statistics(samples: Sequence[np.ndarray], source: str) -> dict[str, float]:
    """nnU-Net's foreground intensity properties of the pooled ``samples``: mean, std, 0.5 and 99.5 percentiles.

    Raises:
        InputError: naming ``source``, when no case has a foreground voxel.
    """
    pooled = np.concatenate([np.asarray(s, dtype=np.float64) for s in samples]) if samples else np.zeros(0)
    if pooled.size == 0:
        raise InputError(f"{source}: no foreground voxel in the training labels; cannot compute intensity statistics")
    low, high = np.percentile(pooled, [0.5, 99.5])
    return {"mean": float(pooled.mean()), "std": float(pooled.std()),
            "percentile_00_5": float(low), "percentile_99_5": float(high)}


@dataclass(frozen=True)
class Normalization:
    """Clip to ``window`` (if any), then map ``fixed`` = (a, b) to (0, 1), or, when ``fixed`` is None,
    each volume's own (min, max) after clipping: ``(x - a) / (b - a)``.

    ``dataset`` normalisation is ``window = (p0.5, p99.5)`` and ``fixed = (mean, mean + std)``, i.e.
    the z-score ``(x - mean) / std``.
    """

    window: tuple[float, float] | None
    fixed: tuple[float, float] | None = None

    @classmethod
    def of(cls, mode: str, window: Sequence[float] | None, statistics: Mapping[str, float] | None,
           source: str) -> "Normalization":
        """The normalisation ``mode`` (:data:`NORMALIZATIONS`) with a data set's ``window`` and ``statistics``.

        Raises:
            InputError: naming ``source``, for ``dataset`` without statistics or an unknown mode.
        """
        if mode == "minmax":
            return cls(None if window is None else (float(window[0]), float(window[1])))
        if mode != "dataset":
            raise InputError(f"{source}: normalization must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}")
        if not statistics:
            raise InputError(f"{source}: normalization 'dataset' needs the data set's intensity statistics "
                             "(dataset.json 'intensity', written by `skcdf prepare ... --spacing`)")
        std = max(float(statistics["std"]), 1e-8)
        return cls((float(statistics["percentile_00_5"]), float(statistics["percentile_99_5"])),
                   (float(statistics["mean"]), float(statistics["mean"]) + std))

    @classmethod
    def from_preprocessing(cls, preprocessing: Mapping) -> "Normalization":
        """What a checkpoint's ``preprocessing`` trained with (``minmax`` for checkpoints that predate the key)."""
        return cls.of(preprocessing.get("normalization") or "minmax", preprocessing.get("window"),
                      preprocessing.get("intensity"), "checkpoint preprocessing")

    @property
    def background(self) -> float:
        """What air outside the scan normalises to, and so what pads a volume smaller than a patch or window:
        0 under min-max (the clipped minimum, as the reference pads); the z-score of the clip's low end under
        ``dataset``, where 0 would be the foreground's mean, soft tissue."""
        if self.fixed is None:
            return 0.0
        low = self.window[0] if self.window is not None else self.fixed[0]
        return (low - self.fixed[0]) / (self.fixed[1] - self.fixed[0])

    def value_range(self, volume: np.ndarray) -> tuple[float, float]:
        """The (a, b) mapped onto (0, 1) for ``volume`` (D, H, W)."""
        return self.fixed if self.fixed is not None else intensity_range(volume, self.window)

    def __call__(self, volume: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
        """``volume`` (or a crop of it, with the whole volume's ``value_range``) normalised: float32, same shape."""
        return scale_intensity(volume, self.window, value_range or self.value_range(volume))
