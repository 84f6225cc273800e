"""Metrics against medpy (the reference's implementation) and the SPEC §4 empty-side conventions;
the evaluate command's files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as medpy
from scipy import ndimage

from skcdf.cli import main
from skcdf.evaluation import CSV_COLUMNS, evaluate_folders
from skcdf.metrics import EMPTY_PENALTY, METRICS, dice_per_class, evaluate_case, surface_voxels
from skcdf.utils import InputError

SPACING = (2.5, 0.8, 0.7)


def random_blobs(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """Label map of smooth random blobs, many of them touching the volume border."""
    field = ndimage.gaussian_filter(rng.normal(size=(num_classes,) + shape), sigma=(0,) + (2,) * len(shape))
    labels = field.argmax(0) + 1
    labels[field.max(0) < np.quantile(field.max(0), 0.5)] = 0
    return labels


def ellipsoid(shape: tuple[int, int, int], centre, radii) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii)) <= 1


def real_shaped_pair() -> tuple[np.ndarray, np.ndarray]:
    """Organ-like structures: a sphere, a tube through the whole depth (touching both z borders), an
    ellipsoid cut by the y and x borders, and a thin plate; the prediction is shifted and resized."""
    shape = (20, 36, 32)
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    gt[ellipsoid(shape, (10, 12, 10), (6, 7, 7))] = 1
    pred[ellipsoid(shape, (11, 13, 9), (5, 8, 7))] = 1
    gt[((y - 27) ** 2 + (x - 8) ** 2 <= 9) & (z >= 0)] = 2
    pred[((y - 28) ** 2 + (x - 9) ** 2 <= 6) & (z >= 1)] = 2
    gt[ellipsoid(shape, (8, 34, 30), (5, 6, 6))] = 3
    pred[ellipsoid(shape, (9, 33, 31), (5, 6, 5))] = 3
    gt[2:4, 2:20, 20:24] = 4
    pred[2:5, 3:20, 20:23] = 4
    return pred, gt


def medpy_rows(pred: np.ndarray, gt: np.ndarray, label: int, spacing=None, connectivity=1) -> dict:
    p, g = pred == label, gt == label
    return {
        "dice": 100 * medpy.dc(p, g),
        "asd": medpy.asd(p, g, voxelspacing=spacing, connectivity=connectivity),
        "hd95": medpy.hd95(p, g, voxelspacing=spacing, connectivity=connectivity),
        "assd": medpy.assd(p, g, voxelspacing=spacing, connectivity=connectivity),
    }


def assert_matches_medpy(pred: np.ndarray, gt: np.ndarray, classes, spacing=None, connectivity=1) -> None:
    rows = evaluate_case(pred, gt, classes, spacing, connectivity=connectivity, threads=1)
    for row in rows:
        expected = medpy_rows(pred, gt, row["class"], spacing, connectivity)
        suffix = "" if spacing is None else "_mm"
        for metric, value in expected.items():
            name = metric if metric == "dice" else metric + suffix
            assert row[name] == pytest.approx(value, abs=1e-6), (row["class"], name)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_blobs_match_medpy(seed):
    rng = np.random.default_rng(seed)
    shape = (18, 24, 22)
    gt = random_blobs(rng, shape, 3)
    pred = np.where(rng.random(shape) < 0.05, rng.integers(0, 4, shape), np.roll(gt, 1, axis=seed))
    assert_matches_medpy(pred, gt, [1, 2, 3])
    assert_matches_medpy(pred, gt, [1, 2, 3], spacing=SPACING)


def test_real_shapes_touching_the_border_match_medpy():
    pred, gt = real_shaped_pair()
    assert gt[0, 27, 8] == 2 and gt[-1, 27, 8] == 2 and gt[8, -1, -1] == 3  # structures reach the border
    assert_matches_medpy(pred, gt, [1, 2, 3, 4])
    assert_matches_medpy(pred, gt, [1, 2, 3, 4], spacing=SPACING)


@pytest.mark.parametrize("connectivity", [2, 3])
def test_other_connectivities_match_medpy(connectivity):
    pred, gt = real_shaped_pair()
    assert_matches_medpy(pred, gt, [1, 2, 4], connectivity=connectivity)


def test_background_class_and_2d_maps_match_medpy():
    rng = np.random.default_rng(5)
    gt = random_blobs(rng, (30, 28), 2)
    pred = np.roll(gt, 2, axis=1)
    assert_matches_medpy(pred, gt, [0, 1, 2])


@pytest.mark.parametrize("connectivity", [1, 2, 3])
def test_surface_of_the_bounding_box_crop_is_medpys_border(connectivity):
    """Eroding only the object's bounding box gives medpy's full-volume border, at the volume edge too."""
    mask = np.zeros((6, 9, 7), bool)
    mask[:, 2:6, 1:] = True  # touches z=0, z=5 and x=6
    mask[2, 7, 3] = True  # and a lone voxel
    footprint = ndimage.generate_binary_structure(3, connectivity)
    expected = np.argwhere(mask ^ ndimage.binary_erosion(mask, structure=footprint))
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = [s.start for s in box]
    np.testing.assert_array_equal(surface_voxels(mask, connectivity), expected)
    np.testing.assert_array_equal(surface_voxels(mask[box], connectivity) + offset, expected)


def test_empty_side_conventions():
    gt = np.zeros((8, 9, 10), np.uint8)
    pred = np.zeros_like(gt)
    gt[2:5, 2:5, 2:5] = 1  # class 1: only in the reference
    pred[4:7, 4:7, 4:7] = 2  # class 2: only in the prediction; class 3: in neither
    for spacing in (None, SPACING):
        rows = {row["class"]: row for row in evaluate_case(pred, gt, [1, 2, 3], spacing, threads=1)}
        for label in (1, 2):
            assert rows[label]["dice"] == 0
            assert [rows[label][m] for m in ("asd", "hd95", "assd")] == [EMPTY_PENALTY] * 3
            assert all(math.isnan(rows[label][m]) for m in ("asd_mm", "hd95_mm", "assd_mm"))
        assert [rows[3][m] for m in ("dice", "asd", "hd95", "assd")] == [100, 0, 0, 0]
        both_empty_mm = [rows[3][m] for m in ("asd_mm", "hd95_mm", "assd_mm")]
        assert all(math.isnan(v) for v in both_empty_mm) if spacing is None else both_empty_mm == [0, 0, 0]
        assert (rows[1]["pred_voxels"], rows[1]["gt_voxels"]) == (0, 27)
    np.testing.assert_array_equal(dice_per_class(pred, gt, [1, 2, 3]), [0, 0, 100])


def test_dice_per_class_matches_medpy():
    pred, gt = real_shaped_pair()
    expected = [100 * medpy.dc(pred == c, gt == c) for c in (1, 2, 3, 4)]
    np.testing.assert_allclose(dice_per_class(pred, gt, [1, 2, 3, 4]), expected, atol=1e-9)


def test_threads_give_the_same_rows():
    pred, gt = real_shaped_pair()
    assert evaluate_case(pred, gt, [1, 2, 3, 4], SPACING, threads=1) == evaluate_case(pred, gt, [1, 2, 3, 4], SPACING, threads=2)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(np.zeros((4, 4, 4), int), np.zeros((4, 4, 5), int), [1])
    with pytest.raises(ValueError, match="integer"):
        dice_per_class(np.zeros((4, 4, 4), float), np.zeros((4, 4, 4), int), [1])
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(np.zeros((4, 4, 4), int), np.zeros((4, 4, 4), int), [1], spacing=(1, 1))


# ------------------------------------------------------------------------------------------ folders


def write_image(path, labels: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0)) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing_zyx)))
    sitk.WriteImage(image, str(path))


def read_csv(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture
def label_folders(tmp_path):
    """PRED and GT folders of three cases in mixed formats, GT with anisotropic spacing."""
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    cases = {}
    for i, case in enumerate(["case01", "case02", "case03"]):
        gt = random_blobs(rng, (10, 16, 14), 3)
        pred = np.roll(gt, 1, axis=i)
        pred[pred == 3] = 0 if case == "case02" else 3  # a missed organ: penalty row
        write_image(gt_dir / f"{case}.nii.gz", gt, SPACING)
        if case == "case03":
            np.save(pred_dir / f"{case}.npy", pred)
        else:
            write_image(pred_dir / f"{case}.nrrd", pred)
        cases[case] = (pred, gt)
    return pred_dir, gt_dir, cases


def test_evaluate_folders_writes_per_case_summary_and_table(label_folders, tmp_path):
    pred_dir, gt_dir, cases = label_folders
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, gt_dir, out, workers=1)

    rows = read_csv(out / "per_case.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 3 * 3 and sorted({r["case"] for r in rows}) == sorted(cases)
    for row in rows:
        pred, gt = cases[row["case"]]
        label = int(row["class"])
        expected = medpy_rows(pred, gt, label) if (pred == label).any() else {"dice": 0.0, "asd": EMPTY_PENALTY}
        assert float(row["dice"]) == pytest.approx(expected["dice"], abs=1e-6)
        assert float(row["asd"]) == pytest.approx(expected["asd"], abs=1e-6)
        if (pred == label).any():
            assert float(row["asd_mm"]) == pytest.approx(medpy.asd(pred == label, gt == label, SPACING), abs=1e-6)

    dice = np.array([[float(r["dice"]) for r in rows if r["class"] == str(c)] for c in (1, 2, 3)])
    saved = json.loads((out / "summary.json").read_text())
    assert saved["num_cases"] == 3 and saved["classes"] == [1, 2, 3] and saved["class_abbrevs"] is None
    np.testing.assert_allclose(saved["per_class"]["dice"], dice.mean(1))
    assert saved["average"]["dice"] == pytest.approx(dice.mean())
    assert set(saved["average"]) == set(METRICS) and summary["num_cases"] == 3
    table = (out / "table.md").read_text().splitlines()
    assert table[0].split("|")[1:-1] == [" Method ", " 1 ", " 2 ", " 3 ", " Dice (%) ", " ASD (voxel) "]
    assert f"{dice.mean():.2f}" in table[2]


def test_evaluate_on_a_prepared_dataset(tmp_path):
    """GT = prepared data set: classes and abbrevs from dataset.json, split selects the cases, and
    the mm metrics use the prepared grid's spacing derived from the geometry json."""
    root = tmp_path / "data"
    (root / "npy").mkdir(parents=True)
    (root / "splits").mkdir()
    names = ["background", "spleen", "liver", "aorta"]
    (root / "dataset.json").write_text(json.dumps(
        {"name": "toy", "num_classes": 4, "class_names": names, "class_abbrevs": ["BG", "Sp", "Li", "Ao"],
         "size": [8, 12, 12], "window": [-75, 275], "modality": "CT"}))
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    rng = np.random.default_rng(1)
    for case in ("a", "b", "c"):
        gt = random_blobs(rng, (8, 12, 12), 2)
        np.save(root / "npy" / f"{case}_image.npy", rng.normal(size=gt.shape).astype(np.float32))
        np.save(root / "npy" / f"{case}_label.npy", gt.astype(np.uint8))
        np.save(pred_dir / f"{case}.npy", np.roll(gt, 1, axis=2).astype(np.uint8))
    (root / "npy" / "a_geometry.json").write_text(json.dumps(
        {"size": [24, 24, 16], "spacing": [0.5, 0.5, 1.0], "origin": [0, 0, 0],
         "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "source": None}))
    (root / "splits" / "test.txt").write_text("a\nb\n")

    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, root, out, split="test", workers=1)
    rows = read_csv(out / "per_case.csv")
    assert summary["classes"] == [1, 2, 3] and summary["class_abbrevs"] == ["Sp", "Li", "Ao"]
    assert [r["case"] for r in rows] == ["a"] * 3 + ["b"] * 3
    pred, gt = np.load(pred_dir / "a.npy"), np.load(root / "npy" / "a_label.npy")
    a1 = rows[0]
    assert float(a1["asd_mm"]) == pytest.approx(medpy.asd(pred == 1, gt == 1, (2.0, 1.0, 1.0)), abs=1e-6)
    assert rows[3]["asd_mm"] == "nan"  # case b has no geometry: no spacing
    assert (out / "table.md").read_text().splitlines()[0].startswith("| Method | Sp | Li | Ao |")


def test_missing_cases_are_named(label_folders, tmp_path):
    pred_dir, gt_dir, _ = label_folders
    (gt_dir / "case02.nii.gz").unlink()
    with pytest.raises(InputError, match="no ground truth for case.*case02"):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "eval", workers=1)
    (pred_dir / "case03.npy").unlink()
    (gt_dir / "splits").mkdir()
    (gt_dir / "splits" / "test.txt").write_text("case01\ncase03\n")
    with pytest.raises(InputError, match="no prediction for case.*case03"):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "eval", split="test", workers=1)
    assert not (tmp_path / "eval").exists()


def test_evaluate_command(label_folders, tmp_path, capsys):
    pred_dir, gt_dir, _ = label_folders
    out = tmp_path / "eval"
    assert main(["evaluate", str(pred_dir), str(gt_dir), "--classes", "1", "2", "--out", str(out), "--workers", "2"]) == 0
    assert len(read_csv(out / "per_case.csv")) == 3 * 2
    assert "Dice (%)" in capsys.readouterr().out
    assert main(["evaluate", str(pred_dir), str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
