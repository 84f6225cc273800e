"""The data keys of issue 27 (normalization, patch_sampling, foreground_share, class_sampling_power):
defaults, checks, and how the training streams and the checkpoint use them."""

from __future__ import annotations

import pytest

from skcdf.data.intensity import Normalization
from skcdf.train.config import DEFAULTS, load_config
from skcdf.train.data_options import normalization, patch_sampling, preprocessing
from skcdf.utils import InputError

STATS = {"mean": 40.0, "std": 80.0, "percentile_00_5": -100.0, "percentile_99_5": 250.0}


def test_defaults_keep_the_reference_protocol_and_own_data_takes_what_measured_best():
    assert (DEFAULTS["normalization"], DEFAULTS["patch_sampling"]) == ("minmax", "uniform")
    assert (DEFAULTS["foreground_share"], DEFAULTS["class_sampling_power"]) == (0.33, 0.5)
    for preset in ("synapse_20p", "amos_5p", "phantom", "phantom_tiny"):
        config = load_config(preset)
        assert (config.normalization, config.patch_sampling, config.val_region) == ("minmax", "uniform", "crop"), preset
    own = load_config("own_data")
    assert (own.normalization, own.patch_sampling) == ("minmax", "uniform")  # docs/results.md §8.1
    assert own.val_region == "whole"


@pytest.mark.parametrize("overrides, message", [
    (["normalization=zscore"], "normalization must be one of minmax, dataset"),
    (["patch_sampling=rare"], "patch_sampling must be one of uniform, foreground, class"),
    (["foreground_share=1.5"], "foreground_share must lie in"),
    (["class_sampling_power=-1"], "class_sampling_power must be >= 0"),
])
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(InputError, match=message):
        load_config("own_data", overrides)


def test_the_labeled_stream_samples_as_configured_and_the_unlabeled_one_uniformly():
    config = load_config("own_data", ["patch_sampling=class", "foreground_share=0.5", "class_sampling_power=1"])
    labeled, unlabeled = patch_sampling(config, "labeled"), patch_sampling(config, "unlabeled")
    assert (labeled.mode, labeled.foreground_share, labeled.class_power) == ("class", 0.5, 1.0)
    assert unlabeled.mode == "uniform"


def test_normalization_comes_from_the_data_set_and_travels_in_the_checkpoint(tmp_path):
    info = {"window": [-75.0, 275.0], "intensity": STATS, "spacing": [1.0, 1.0, 2.5], "size": None,
            "class_names": ["background", "liver"], "class_abbrevs": ["BG", "Li"], "lateral_pairs": None}
    config = load_config("own_data", ["normalization=dataset"])
    assert normalization(config, info, tmp_path) == Normalization((-100.0, 250.0), (40.0, 120.0))
    assert normalization(config.replace(normalization="minmax"), info, tmp_path) == Normalization((-75.0, 275.0))
    saved = preprocessing(config, info)
    assert Normalization.from_preprocessing(saved) == normalization(config, info, tmp_path)
    assert saved["spacing"] == [1.0, 1.0, 2.5] and saved["size"] is None
    with pytest.raises(InputError, match=r"dataset.json: normalization 'dataset' needs .* --spacing"):
        normalization(config, {**info, "intensity": None}, tmp_path)
