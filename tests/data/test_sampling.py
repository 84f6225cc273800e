"""Patches from volumes of any size: sizes, the foreground share, the class-aware sampler's frequencies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skcdf.data.layout import write_case
from skcdf.data.loaders import PatchDataset
from skcdf.data.sampling import PatchSampler, PatchSampling, centred_starts, class_weights

PATCH = (8, 16, 16)


@pytest.fixture
def varied_root(tmp_path, rng):
    """Three labeled cases of different sizes, one smaller than the patch on two axes; class 3 is rare."""
    for case, shape in (("small", (5, 12, 40)), ("mid", (20, 30, 30)), ("big", (33, 70, 50))):
        label = np.zeros(shape, np.uint8)
        label[: shape[0] // 2, : shape[1] // 2] = 1
        label[-2:, -3:, -4:] = 2
        label[0, -1, 0] = 3
        write_case(tmp_path, case, rng.normal(0, 100, shape).astype(np.float32), label, None)
    return tmp_path


@pytest.mark.parametrize("mode", ["uniform", "foreground", "class"])
def test_every_patch_has_the_patch_size(varied_root, mode):
    dataset = PatchDataset(varied_root, ["small", "mid", "big"], PATCH, with_labels=True, window=None,
                           sampling=PatchSampling(mode, foreground_share=0.5))
    for seed in range(30):
        item = dataset[(seed % 3, seed)]
        assert item["image"].shape == (1, *PATCH) and item["label"].shape == PATCH


def test_uniform_sampling_draws_what_the_reference_loader_draws(varied_root):
    reference = PatchDataset(varied_root, ["mid", "big"], PATCH, with_labels=True, window=None)
    uniform = PatchDataset(varied_root, ["mid", "big"], PATCH, with_labels=True, window=None,
                           sampling=PatchSampling("uniform"))
    for seed in range(10):
        assert torch.equal(reference[(1, seed)]["image"], uniform[(1, seed)]["image"])


def test_the_foreground_share_holds_over_many_draws(varied_root):
    labels = [np.load(varied_root / "npy" / "big_label.npy")]
    sampler = PatchSampler(PatchSampling("foreground", foreground_share=0.33), labels)
    generator = torch.Generator().manual_seed(0)
    centres = [sampler.centre(0, labels[0].shape, generator) for _ in range(4000)]
    forced = [c for c in centres if c is not None]
    assert abs(len(forced) / 4000 - 0.33) < 3 * np.sqrt(0.33 * 0.67 / 4000)
    assert all(labels[0][c] > 0 for c in forced)
    # uniform over the foreground voxels: classes in proportion to their voxels
    drawn = np.bincount([labels[0][c] for c in forced], minlength=4)[1:] / len(forced)
    expected = np.bincount(labels[0].ravel(), minlength=4)[1:] / np.count_nonzero(labels[0])
    assert np.allclose(drawn, expected, atol=0.03)


def test_class_aware_frequencies_match_the_weights(varied_root):
    cases = ["small", "mid", "big"]
    labels = [np.load(varied_root / "npy" / f"{case}_label.npy") for case in cases]
    sampler = PatchSampler(PatchSampling("class", foreground_share=1.0, class_power=1.0), labels)
    counts = sum(np.bincount(label.ravel(), minlength=4) for label in labels)
    naive = np.array([0.0] + [1.0 / counts[c] for c in range(1, 4)])  # inverse frequency, by hand
    assert np.allclose(sampler.weights, naive)
    generator = torch.Generator().manual_seed(1)
    drawn = np.bincount([labels[2][sampler.centre(2, labels[2].shape, generator)] for _ in range(4000)],
                        minlength=4)
    expected = naive / naive.sum()
    assert np.allclose(drawn / 4000, expected, atol=0.03)
    assert drawn[3] > drawn[1]  # the one-voxel class is drawn more than the large one


def test_patch_starts_contain_the_chosen_voxel(varied_root):
    dataset = PatchDataset(varied_root, ["big"], PATCH, with_labels=True, window=None,
                           sampling=PatchSampling("class", foreground_share=1.0, class_power=1.0))
    hits = [bool((dataset[(0, seed)]["label"] == 3).any()) for seed in range(200)]
    assert np.mean(hits) > 0.5  # inverse frequency gives the one-voxel class most of the weight


def test_class_weights_power_zero_weighs_present_classes_alike():
    assert np.array_equal(class_weights(np.array([100, 5, 0, 7]), 0.0), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="needs with_labels"):
        PatchDataset(".", [], PATCH, with_labels=False, sampling=PatchSampling("foreground"))


def test_a_volume_smaller_than_the_patch_is_placed_to_centre_the_voxel():
    """Along an axis of 5 voxels in a patch of 8, voxel c ends up as near the patch's centre (4) as the places
    the volume can take (offsets 0..3) allow: checked against every placement by brute force."""
    for c in range(5):
        start = centred_starts((c, 0, 0), (5, 40, 40), PATCH)[0]
        offsets = range(0, 8 - 5 + 1)
        best = min(offsets, key=lambda offset: (abs(c + offset - 4), offset))
        assert -start == best and 0 <= c - start < 8
