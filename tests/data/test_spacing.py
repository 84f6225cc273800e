"""The spacing-based path (issue 27): target spacing, grids, resampling round trips, normalisation statistics."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.data.back_to_scan import labels_in_original_space
from skcdf.data.geometry import Geometry, prepared_grid, resample_to_size, to_original_space
from skcdf.data.intensity import Normalization, foreground_sample, intensity_statistics
from skcdf.data.preprocess import normalize_intensity
from skcdf.data.spacing import check_scan_for_spacing, size_for_spacing, target_spacing
from skcdf.utils import InputError

from .conftest import UNUSUAL_ORIGIN, UNUSUAL_SPACING, unusual_direction
from .test_preprocess import _unusual_image


def test_target_spacing_is_the_median_unless_one_axis_is_anisotropic():
    spacings = [(0.7, 0.7, 2.0), (0.8, 0.8, 1.0), (0.9, 0.9, 3.0)]
    assert target_spacing(spacings, [(512, 512, 100)] * 3) == pytest.approx((0.8, 0.8, 2.0))
    # z: median 5 > 3 x 0.8 and median 60 slices x 3 < 512 voxels: the 10th percentile of z, not the median
    thick = [(0.8, 0.8, 5.0)] * 8 + [(0.8, 0.8, 1.5), (0.8, 0.8, 1.0)]
    z = sorted(s[2] for s in thick)
    expected_z = z[0] + 0.9 * (z[1] - z[0])  # numpy's linear 10th percentile of 10 values, by hand
    assert target_spacing(thick, [(512, 512, 60)] * 10) == pytest.approx((0.8, 0.8, expected_z))
    # ... but never finer than the other axes (nnU-Net adds 1e-5)
    fine = [(0.8, 0.8, 5.0)] * 8 + [(0.8, 0.8, 0.5)] * 2
    assert target_spacing(fine, [(512, 512, 60)] * 10)[2] == pytest.approx(0.8 + 1e-5)
    # anisotropic spacing alone (as many slices as rows) keeps the median
    assert target_spacing(thick, [(100, 100, 100)] * 10)[2] == pytest.approx(5.0)


def test_grid_at_a_spacing_covers_the_scan_box():
    geometry = Geometry((512, 512, 120), (0.8, 0.8, 2.5), UNUSUAL_ORIGIN, unusual_direction())
    size = size_for_spacing(geometry, (1.5, 1.5, 3.0))
    assert size == (100, 273, 273)  # round(300 / 3), round(409.6 / 1.5)
    grid = prepared_grid(geometry, size)
    assert np.allclose(np.array(grid.size) * grid.spacing, np.array(geometry.size) * geometry.spacing)
    assert np.allclose(grid.spacing, (1.5, 1.5, 3.0), rtol=0.01)


def test_label_round_trip_through_a_finer_spacing_is_exact(rng):
    label = rng.integers(0, 5, (6, 10, 14)).astype(np.uint8)
    image = _unusual_image(label)
    half = tuple(s / 2 for s in UNUSUAL_SPACING)
    fine = resample_to_size(image, size_for_spacing(Geometry.of_image(image), half), is_label=True)
    assert fine.GetSize() == (28, 20, 12)
    back = to_original_space(sitk.GetArrayFromImage(fine), Geometry.of_image(image), is_label=True)
    assert np.array_equal(sitk.GetArrayFromImage(back), label)


def test_slabwise_labels_equal_resampling_every_class_whole(rng):
    """The slab-by-slab argmax against resampling each class over the whole scan, then argmax."""
    geometry = Geometry((37, 29, 70), (0.9, 0.9, 1.1), UNUSUAL_ORIGIN, unusual_direction())
    probabilities = rng.random((4, 23, 17, 21)).astype(np.float32)
    whole = np.stack([sitk.GetArrayFromImage(to_original_space(channel, geometry, is_label=False))
                      for channel in probabilities])
    labels = labels_in_original_space(probabilities, geometry, slab=8)
    assert labels.shape == (70, 29, 37)
    assert np.mean(labels == whole.argmax(0)) > 0.999  # equal up to float rounding at near-ties


def test_foreground_statistics_match_numpy(rng):
    images = [rng.normal(50, 40, (8, 30, 50)).astype(np.float32) for _ in range(3)]
    labels = [(rng.random(image.shape) < 0.3).astype(np.uint8) for image in images]  # ~3,600 voxels each
    samples = [foreground_sample(image, label, f"case{i}") for i, (image, label) in enumerate(zip(images, labels))]
    pooled = np.concatenate([image[label > 0] for image, label in zip(images, labels)]).astype(np.float64)
    stats = intensity_statistics(samples, "test")
    assert stats["mean"] == pytest.approx(pooled.mean()) and stats["std"] == pytest.approx(pooled.std())
    ordered = np.sort(pooled)
    for q, key in ((0.005, "percentile_00_5"), (0.995, "percentile_99_5")):  # linear interpolation, by hand
        position = q * (len(ordered) - 1)
        low = int(position)
        assert stats[key] == pytest.approx(ordered[low] + (position - low) * (ordered[low + 1] - ordered[low]))
    big, values = np.ones((40, 40, 40), np.uint8), rng.permutation(64_000).reshape(40, 40, 40)
    sample = foreground_sample(values, big, "x")
    assert len(sample) == 10_000 and len(np.unique(sample)) == 10_000  # drawn without replacement
    assert np.array_equal(sample, foreground_sample(values, big, "x"))  # the same in any process
    with pytest.raises(InputError, match="no foreground"):
        intensity_statistics([np.zeros(0)], "data")


def test_normalizations_against_naive_formulas(rng):
    volume = rng.normal(0, 300, (5, 6, 7)).astype(np.float32)
    assert np.array_equal(Normalization((-75.0, 275.0))(volume), normalize_intensity(volume, (-75, 275)))
    stats = {"mean": 40.0, "std": 80.0, "percentile_00_5": -100.0, "percentile_99_5": 250.0}
    dataset = Normalization.of("dataset", (-75, 275), stats, "x")
    naive = (np.clip(volume, -100, 250) - 40) / 80
    assert np.allclose(dataset(volume), naive, atol=1e-5)
    assert np.allclose(dataset(volume[1:3], dataset.value_range(volume)), naive[1:3], atol=1e-5)
    with pytest.raises(InputError, match="intensity statistics"):
        Normalization.of("dataset", None, None, "data/dataset.json")


@pytest.mark.parametrize("spacing, size, problem", [
    ((0.8, 0.8, 30.0), (64, 64, 10), "localiser"),
    ((0.8, 0.8, 2.0), (64, 64, 1), "2-D image"),
    ((0.8, 0.0, 2.0), (64, 64, 10), "positive"),
    ((0.8, float("nan"), 2.0), (64, 64, 10), "positive"),
])
def test_scans_the_spacing_path_cannot_use_are_refused(spacing, size, problem):
    geometry = Geometry(size, spacing, (0.0,) * 3, tuple(np.eye(3).ravel()))
    with pytest.raises(InputError, match=f"scan.nii.gz: .*{problem}"):
        check_scan_for_spacing(geometry, (0.8, 0.8, 2.5), "scan.nii.gz")
