"""`skcdf prepare`: raw Synapse, AMOS and nnU-Net-style folders made here → the prepared layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.cli import main
from skcdf.data.layout import list_cases, load_geometry, load_image, load_label, read_dataset_info, read_split
from skcdf.data.prepare import prepare_dataset
from skcdf.utils import InputError

from .conftest import UNUSUAL_ORIGIN, UNUSUAL_SPACING, geometry_of, synthetic_case, unusual_direction, write_volume

# Raw volumes of (12, 21, 24) prepared at a third of that: every prepared voxel centre lies exactly on
# the raw voxel centre (3i + 1), so the expected prepared arrays are simply raw[1::3, 1::3, 1::3].
RAW_SHAPE, SIZE = (12, 21, 24), (4, 7, 8)
EVERY_THIRD = (slice(1, None, 3),) * 3


def _write_pair(image_path: Path, label_path: Path | None, rng: np.random.Generator, num_classes: int = 14,
                **geometry) -> tuple:
    image, label = synthetic_case(rng, RAW_SHAPE, num_classes)
    write_volume(image_path, image, **geometry)
    if label_path is not None:
        write_volume(label_path, label, **geometry)
    return image, label


def _nnunet_folder(src: Path, rng: np.random.Generator, cases: int = 4, labels: dict | None = None,
                   suffix: str = ".nii.gz") -> dict[str, tuple]:
    """imagesTr/<case>_0000 + labelsTr/<case> for ``cases`` cases, dataset.json with v2-style labels."""
    arrays = {f"c{i}": _write_pair(src / "imagesTr" / f"c{i}_0000{suffix}", src / "labelsTr" / f"c{i}{suffix}", rng)
              for i in range(cases)}
    labels = labels or {name: value for value, name in enumerate(["background"] + [f"organ {k}" for k in range(1, 14)])}
    (src / "dataset.json").write_text(json.dumps({"name": "mine", "channel_names": {"0": "CT"}, "labels": labels}))
    return arrays


def test_prepare_synapse_with_default_splits(tmp_path, rng):
    src = tmp_path / "RawData" / "Training"
    raw = {f"{i:04d}": _write_pair(src / "img" / f"img{i:04d}.nii.gz", src / "label" / f"label{i:04d}.nii.gz", rng)
           for i in range(1, 31)}
    write_volume(src / "img" / "img0099.nii.gz", synthetic_case(rng, RAW_SHAPE)[0])  # no label: unlabeled pool
    out = prepare_dataset("synapse", tmp_path / "RawData", tmp_path / "out", size=SIZE, seed=3, workers=1)

    info = read_dataset_info(out)
    assert info["num_classes"] == 14 and info["class_abbrevs"][1] == "Sp" and info["size"] == list(SIZE)
    assert info["window"] == [-75, 275]
    assert list_cases(out) == sorted([*raw, "0099"])
    splits = {name: read_split(out, name) for name in ("train", "eval", "test", "labeled_20p", "unlabeled_20p")}
    assert [len(splits[n]) for n in ("train", "eval", "test", "labeled_20p")] == [20, 4, 6, 4]
    assert sorted(splits["train"] + splits["eval"] + splits["test"]) == sorted(raw)
    assert sorted(splits["labeled_20p"] + splits["unlabeled_20p"]) == sorted(splits["train"] + ["0099"])
    for case_id, (image, label) in raw.items():
        np.testing.assert_allclose(load_image(out, case_id), image[EVERY_THIRD], atol=1e-3)
        np.testing.assert_array_equal(load_label(out, case_id), label[EVERY_THIRD])
    assert not (out / "npy" / "0099_label.npy").exists()
    assert load_geometry(out, "0007").source == str((src / "img" / "img0007.nii.gz").resolve())

    again = prepare_dataset("synapse", tmp_path / "RawData", tmp_path / "again", size=SIZE, seed=3, workers=1)
    other = prepare_dataset("synapse", tmp_path / "RawData", tmp_path / "other", size=SIZE, seed=4, workers=1)
    assert read_split(again, "labeled_20p") == splits["labeled_20p"] and read_split(again, "test") == splits["test"]
    assert read_split(other, "train") != splits["train"]


def test_prepare_amos_takes_ct_only_and_dataset_json_names(tmp_path, rng):
    src = tmp_path / "amos"
    for tag, numbers in (("Tr", (1, 2, 3, 540)), ("Va", (7, 8))):
        for n in numbers:
            name = f"amos_{n:04d}.nii.gz"
            _write_pair(src / f"images{tag}" / name, src / f"labels{tag}" / name, rng)
    names = ["background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach",
             "aorta", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
             "prostate/uterus"]
    (src / "dataset.json").write_text(json.dumps({"labels": {str(i): n for i, n in enumerate(names)}}))

    out = prepare_dataset("amos", src, tmp_path / "out", size=SIZE, workers=1)
    info = read_dataset_info(out)
    assert info["class_names"] == names and info["class_abbrevs"][-3:] == ["Du", "Bl", "P/U"]
    assert list_cases(out) == ["amos_0001", "amos_0002", "amos_0003", "amos_0007", "amos_0008"]
    # 216:24:120 scaled to 5 cases, every split non-empty; 5% of train labeled (at least one case).
    assert [len(read_split(out, n)) for n in ("train", "eval", "test", "labeled_5p", "unlabeled_5p")] == [2, 1, 2, 1, 1]

    with_mri = prepare_dataset("amos", src, tmp_path / "mri", size=SIZE, include_mri=True, workers=1)
    assert "amos_0540" in list_cases(with_mri) and read_dataset_info(with_mri)["window"] is None


def test_prepare_nnunet_folder_keeps_unusual_geometry(tmp_path, rng):
    src = tmp_path / "Dataset001"
    geometry = {"spacing": UNUSUAL_SPACING, "origin": UNUSUAL_ORIGIN, "direction": unusual_direction()}
    for i in range(3):
        _write_pair(src / "imagesTr" / f"c{i}_0000.nrrd", src / "labelsTr" / f"c{i}.nrrd", rng, 3, **geometry)
    _write_pair(src / "imagesTs" / "t0_0000.mha", None, rng, **geometry)
    write_volume(src / "imagesTr" / "c0_0001.nrrd", np.zeros(RAW_SHAPE, np.float32))  # second channel: ignored
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"},
                                                  "labels": {"background": 0, "tumour": 2, "organ": 1}}))

    with pytest.warns(UserWarning, match="only channel _0000 is used"):
        out = prepare_dataset("nifti", src, tmp_path / "out", size=SIZE, split_counts=(1, 1, 1), workers=1)
    info = read_dataset_info(out)
    assert info["class_names"] == ["background", "organ", "tumour"] and info["window"] is None
    assert info["modality"] == "MRI"
    assert read_split(out, "unlabeled_20p") == ["t0"]
    for case_id, path in (("c1", src / "imagesTr" / "c1_0000.nrrd"), ("t0", src / "imagesTs" / "t0_0000.mha")):
        saved = load_geometry(out, case_id)
        assert saved.source == str(path.resolve())
        assert dataclasses.replace(saved, source=None) == geometry_of(path)
        np.testing.assert_allclose(saved.spacing, UNUSUAL_SPACING, rtol=1e-6)
        np.testing.assert_allclose(saved.origin, UNUSUAL_ORIGIN, rtol=1e-6)
        np.testing.assert_allclose(saved.direction, unusual_direction(), atol=1e-6)


def test_prepare_honours_user_split_files(tmp_path, rng):
    src = tmp_path / "src"
    _nnunet_folder(src, rng, cases=5)
    splits = tmp_path / "my_splits"
    splits.mkdir()
    for name, ids in (("train", "c0\nc1\nc2\n"), ("eval", "c3\n"), ("test", "c4\n"), ("labeled_20p", "c2\n")):
        (splits / f"{name}.txt").write_text(ids)
    out = prepare_dataset("nifti", src, tmp_path / "out", size=SIZE, splits_dir=splits, workers=1)
    assert read_split(out, "train") == ["c0", "c1", "c2"] and read_split(out, "test") == ["c4"]
    assert read_split(out, "labeled_20p") == ["c2"] and read_split(out, "unlabeled_20p") == ["c0", "c1"]


def _fails_cleanly(tmp_path: Path, src: Path, match: str, **options) -> InputError:
    """Prepare must raise one InputError matching ``match`` and leave no output or staging folder."""
    options = {"size": SIZE, "split_counts": (2, 1, 1), "workers": 1, **options}
    before = set(tmp_path.iterdir())
    with pytest.raises(InputError, match=match) as error:
        prepare_dataset("nifti", src, tmp_path / "out", **options)
    assert set(tmp_path.iterdir()) == before
    return error.value


def test_bad_image_label_pairs_fail_with_one_message_and_no_output(tmp_path, rng):
    src = tmp_path / "src"
    _nnunet_folder(src, rng)
    label_path = src / "labelsTr" / "c1.nii.gz"
    write_volume(label_path, np.zeros((12, 21, 25), np.uint8))
    _fails_cleanly(tmp_path, src, r"c1.nii.gz: label grid does not match image .*c1_0000.nii.gz: size")
    write_volume(label_path, np.zeros(RAW_SHAPE, np.uint8), spacing=(1.0, 1.0, 2.0))
    _fails_cleanly(tmp_path, src, r"c1.nii.gz: label grid does not match image .*: spacing")
    label = np.zeros(RAW_SHAPE, np.uint8)
    label[0, 0, 0] = 20
    write_volume(label_path, label)
    _fails_cleanly(tmp_path, src, r"c1.nii.gz: label values 20 outside 0..13", workers=2)


def test_bad_images_fail_with_one_message_and_no_output(tmp_path, rng):
    src = tmp_path / "src"
    _nnunet_folder(src, rng, suffix=".mha")
    image_path = src / "imagesTr" / "c2_0000.mha"
    image = synthetic_case(rng, RAW_SHAPE)[0]
    image[3, 4, 5] = np.nan
    write_volume(image_path, image)
    _fails_cleanly(tmp_path, src, r"c2_0000.mha: contains 1 NaN or infinite intensities")
    volume = sitk.GetImageFromArray(np.zeros(RAW_SHAPE, np.float32))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(image_path))  # 4-D
    _fails_cleanly(tmp_path, src, r"c2_0000.mha: is a 4-D image")
    image_path.write_bytes(b"ObjectType = Image\nNDims = 3\nthis is broken")
    _fails_cleanly(tmp_path, src, r"c2_0000.mha: cannot be read as an image")


def test_bad_sources_and_splits_fail_with_one_message(tmp_path, rng):
    _fails_cleanly(tmp_path, tmp_path / "missing", r"missing: source folder not found")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(tmp_path, tmp_path / "empty", r"empty: no images found \(expected imagesTr/")
    src = tmp_path / "src"
    _nnunet_folder(src, rng)
    _fails_cleanly(tmp_path, src, r"4 labeled cases, but the split 20/4/6 \(train/eval/test\) needs 30",
                   split_counts=(20, 4, 6))
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text("c0\nc9\n")
    _fails_cleanly(tmp_path, src, r"splits/train.txt: names unknown case 'c9'", splits_dir=splits)
    (splits / "train.txt").write_text("c0\nc1\n")
    (splits / "test.txt").write_text("c2\n")
    _fails_cleanly(tmp_path, src, r"splits/eval.txt: split file not found", splits_dir=splits)
    (src / "dataset.json").unlink()
    _fails_cleanly(tmp_path, src, r"dataset.json: no 'labels' with class names; give the number of classes")


def test_cli_prints_one_error_line(tmp_path, rng, capsys):
    src = tmp_path / "src"
    _nnunet_folder(src, rng)
    write_volume(src / "labelsTr" / "c0.nii.gz", np.full(RAW_SHAPE, 14, np.uint8))
    status = main(["prepare", "nifti", str(src), str(tmp_path / "out"), "--size", "4", "7", "8",
                   "--split-counts", "2", "1", "1", "--workers", "1"])
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(error_lines) == 1
    assert "c0.nii.gz: label values 14 outside 0..13" in error_lines[0]
    assert not (tmp_path / "out").exists()
