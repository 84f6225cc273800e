"""The data keys of a configuration turned into what the loaders take (issue 27): the intensity
normalisation and the placement of training patches. The unlabeled stream always samples uniformly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from skcdf.data.intensity import Normalization
from skcdf.data.sampling import PatchSampling
from skcdf.train.config import Config


def normalization(config: Config, info: Mapping[str, Any], root: Path) -> Normalization:
    """``config.normalization`` with the data set's window and intensity statistics (dataset.json).

    Raises:
        InputError: ``dataset`` normalisation for a data set without statistics (naming its dataset.json).
    """
    return Normalization.of(config.normalization, info.get("window"), info.get("intensity"),
                            str(root / "dataset.json"))


def patch_sampling(config: Config, stream: str) -> PatchSampling:
    """How the ``stream`` ("labeled" or "unlabeled") places its patches: the configured way, or uniformly."""
    mode = config.patch_sampling if stream == "labeled" else "uniform"
    return PatchSampling(mode, config.foreground_share, config.class_sampling_power)


def preprocessing(config: Config, info: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint records for prediction: the prepared grid (a fixed ``size`` or a ``spacing``),
    the intensity normalisation, the patch, the classes and the left/right pairs."""
    return {"size": info.get("size"), "spacing": info.get("spacing"), "window": info.get("window"),
            "normalization": config.normalization, "intensity": info.get("intensity"),
            "patch_size": list(config.patch_size), "class_names": list(info["class_names"]),
            "class_abbrevs": list(info["class_abbrevs"]), "lateral_pairs": info["lateral_pairs"]}
