"""The synthetic abdominal CT data set: determinism, layout, imbalance, anatomy and intensities."""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
import pytest

from skcdf.cli import main
from skcdf.data.layout import list_cases, load_geometry, load_image, load_label, read_dataset_info, read_split
from skcdf.data.phantom import (VARIED_IN_PLANE_SPACING_MM, VARIED_SLICE_SPACING_MM, VARIED_Z_EXTENT_MM,
                                generate_varied_phantom)
from skcdf.data.phantom import (AO, DEFAULT_SHAPE, ES, GA, IVC, LAG, LI, LK, PA, PSV, RAG, RK, SP, make_phantom_case,
                                generate_phantom)
from skcdf.data.prepare import prepare_dataset

from .conftest import geometry_of

TINY = (16, 32, 32)


@pytest.fixture(scope="module")
def default_cases():
    """Two cases at the default shape, generated once for this module."""
    return [make_phantom_case(seed=0, index=i) for i in range(2)]


def test_same_seed_same_case_other_seed_or_index_other_case():
    first, again = make_phantom_case(7, 0, TINY), make_phantom_case(7, 0, TINY)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.label, again.label)
    assert first.geometry == again.geometry
    for other in (make_phantom_case(8, 0, TINY), make_phantom_case(7, 1, TINY)):
        assert not np.array_equal(first.label, other.label)
        assert np.abs(first.image - other.image).mean() > 10


def test_generated_data_set_is_independent_of_workers_and_round_trips_through_nifti(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "one"), "--cases", "5", "--shape", *map(str, TINY), "--seed", "3",
                 "--workers", "1", "--nifti"]) == 0
    assert "largest / smallest foreground class" in capsys.readouterr().out
    two = generate_phantom(tmp_path / "two", cases=5, shape=TINY, seed=3, workers=2)
    one = tmp_path / "one"
    assert list_cases(one) == list_cases(two) == [f"case_{i:04d}" for i in range(1, 6)]
    for case_id in list_cases(one):
        np.testing.assert_array_equal(load_image(one, case_id), load_image(two, case_id))
        np.testing.assert_array_equal(load_label(one, case_id), load_label(two, case_id))
    info = read_dataset_info(one)
    assert info["num_classes"] == 14 and info["size"] == list(TINY) and info["class_abbrevs"][12] == "RAG"
    splits = {name: read_split(one, name) for name in ("train", "eval", "test", "labeled_20p", "unlabeled_20p")}
    assert [len(ids) for ids in splits.values()] == [3, 1, 1, 1, 2]

    # The NIfTI copy carries the case's unusual geometry and prepares back into the same data set.
    geometry = load_geometry(one, "case_0002")
    nifti_geometry = geometry_of(one / "nifti" / "imagesTr" / "case_0002_0000.nii.gz")
    assert nifti_geometry.size == TINY[::-1]
    np.testing.assert_allclose(nifti_geometry.spacing, geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(nifti_geometry.origin, geometry.origin, rtol=1e-6)
    np.testing.assert_allclose(nifti_geometry.direction, geometry.direction, atol=1e-6)
    assert not np.allclose(geometry.direction, np.eye(3).ravel())
    back = prepare_dataset("nifti", one / "nifti", tmp_path / "back", size=TINY, split_counts=(3, 1, 1), workers=1)
    assert dataclasses.replace(load_geometry(back, "case_0002"), source=None) == nifti_geometry
    np.testing.assert_array_equal(load_label(back, "case_0002"), load_label(one, "case_0002"))
    np.testing.assert_allclose(load_image(back, "case_0002"), load_image(one, "case_0002"), atol=0.05)
    back_info = read_dataset_info(back)
    assert (back_info["class_names"], back_info["class_abbrevs"]) == (info["class_names"], info["class_abbrevs"])


def test_class_imbalance_at_default_shape(default_cases):
    for case in default_cases:
        assert case.image.shape == case.label.shape == DEFAULT_SHAPE
        counts = np.bincount(case.label.ravel(), minlength=14)
        assert (counts[1:] > 0).all(), "every organ is present in every case"
        assert counts[0] > 0.85 * counts.sum(), "background dominates"
        assert counts[1:].argmax() + 1 == LI
        assert counts[LI] >= 200 * counts[1:].min()
        foreground = counts[1:].sum()
        for small in (RAG, LAG, ES, GA, PSV):
            assert counts[small] < 0.02 * foreground


def _centroid(label: np.ndarray, value: int) -> np.ndarray:
    return np.argwhere(label == value).mean(0)  # (z, y, x): z superior, y posterior, x patient's left


def test_organs_lie_where_they_belong(default_cases):
    for case in default_cases:
        label = case.label
        body = _centroid(case.image > -500, 1)
        liver, spleen, rk, lk = (_centroid(label, k) for k in (LI, SP, RK, LK))
        assert liver[2] < body[2] < spleen[2], "liver on the patient's right, spleen on the left"
        assert rk[2] < body[2] < lk[2] and rk[1] > body[1] and lk[1] > body[1], "kidneys posterior on both sides"
        for vessel in (AO, IVC):
            depth = np.ptp(np.argwhere(label == vessel)[:, 0])
            assert depth > 0.6 * label.shape[0], "aorta and IVC run through the whole scan"
        assert _centroid(label, IVC)[2] < _centroid(label, AO)[2], "IVC right of the aorta"
        assert _centroid(label, RAG)[0] > rk[0] and _centroid(label, LAG)[0] > lk[0], "adrenals above the kidneys"
        pancreas = np.argwhere(label == PA)
        width_mm = np.ptp(pancreas[:, 2]) * case.geometry.spacing[0]
        height_mm = np.ptp(pancreas[:, 0]) * case.geometry.spacing[2]
        assert width_mm > 1.5 * height_mm, "pancreas lies across the middle"


def test_cases_differ_in_anatomy(default_cases):
    first, second = (case.label == LI for case in default_cases)
    dice = 2 * (first & second).sum() / (first.sum() + second.sum())
    assert dice < 0.9


def _best_interval_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """The best Dice any single intensity interval [low, high] reaches for ``mask``."""
    edges = np.percentile(image[mask], np.arange(0, 101, 2.5))
    low, high = np.meshgrid(edges, edges, indexing="ij")
    low, high = low[high >= low], high[high >= low]
    everything, inside = np.sort(image.ravel()), np.sort(image[mask])

    def count(values: np.ndarray) -> np.ndarray:  # voxels with low <= value <= high
        return np.searchsorted(values, high, "right") - np.searchsorted(values, low, "left")

    return float((2 * count(inside) / (count(everything) + inside.size)).max())


def test_intensities_overlap_like_ct(default_cases):
    for case in default_cases:
        image, label = case.image, case.label
        means = {k: float(image[label == k].mean()) for k in range(1, 14)}
        soft = [means[k] for k in (LI, SP, RK, LK, PA)]
        assert max(soft) - min(soft) < 60, "liver, spleen, kidneys and pancreas within a few tens of HU"
        assert min(means[AO], means[IVC], means[PSV]) > max(means[LI], means[PA]), "vessels brighter"
        body = label == 0
        assert (image[body] < -500).mean() > 0.3 and ((image[body] > -150) & (image[body] < -60)).mean() > 0.05
        for organ in (PA, SP, LK, RAG):
            assert _best_interval_dice(image, label == organ) < 0.5, "intensity alone does not segment it"


def test_varied_scans_span_the_clinical_ranges_of_extent_and_spacing(tmp_path):
    out = generate_varied_phantom(tmp_path / "raw", cases=6, coarsen=8, workers=1)
    images = sorted((out / "imagesTr").iterdir())
    assert len(images) == 6 and len(list((out / "labelsTr").iterdir())) == 6 and (out / "dataset.json").is_file()
    sizes = set()
    for path in images:
        image = sitk.ReadImage(str(path))
        in_plane, _, slices = (s / 8 for s in image.GetSpacing())
        assert VARIED_IN_PLANE_SPACING_MM[0] <= in_plane <= VARIED_IN_PLANE_SPACING_MM[1]
        assert VARIED_SLICE_SPACING_MM[0] <= slices <= VARIED_SLICE_SPACING_MM[1]
        extent = image.GetSize()[2] * image.GetSpacing()[2]
        assert VARIED_Z_EXTENT_MM[0] - image.GetSpacing()[2] <= extent <= VARIED_Z_EXTENT_MM[1] + image.GetSpacing()[2]
        label = sitk.ReadImage(str(out / "labelsTr" / path.name.replace("_0000", "")))
        assert label.GetSize() == image.GetSize() and sitk.GetArrayViewFromImage(label).max() > 0
        sizes.add(image.GetSize())
    assert len(sizes) == 6
