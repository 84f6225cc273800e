"""The prepared layout: writing and reading it back, and reading a bare reference-implementation folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skcdf.data.classes import SYNAPSE_NAMES
from skcdf.data.layout import (Geometry, dataset_info, list_cases, load_geometry, load_image, load_label,
                               read_dataset_info, read_split, staged_output_dir, write_case, write_dataset_info,
                               write_split)
from skcdf.utils import InputError

from .conftest import UNUSUAL_ORIGIN, UNUSUAL_SPACING, synthetic_case, unusual_direction

GEOMETRY = Geometry((24, 20, 12), UNUSUAL_SPACING, UNUSUAL_ORIGIN, unusual_direction(), "/data/scan.nii.gz")


def test_prepared_layout_round_trip(tmp_path, rng):
    image, label = synthetic_case(rng)
    info = dataset_info("demo", SYNAPSE_NAMES, (12, 20, 24), (-75, 275))
    write_dataset_info(tmp_path, info)
    write_case(tmp_path, "a", image, label, GEOMETRY)
    write_case(tmp_path, "b", image + 1, None, None)
    write_split(tmp_path, "train", ["b", "a"])

    assert read_dataset_info(tmp_path) == info
    assert list_cases(tmp_path) == ["a", "b"]
    assert read_split(tmp_path, "train") == ["b", "a"]
    assert read_split(tmp_path, "train.txt") == ["b", "a"]
    np.testing.assert_array_equal(load_image(tmp_path, "a"), image)
    assert load_image(tmp_path, "a").dtype == np.float32
    mapped = load_image(tmp_path, "b", mmap=True)
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(load_label(tmp_path, "a"), label)
    assert load_label(tmp_path, "a").dtype == np.uint8
    assert load_geometry(tmp_path, "a") == GEOMETRY
    assert load_geometry(tmp_path, "b") is None
    assert not list((tmp_path / "npy").glob(".*"))  # no temporary files left


@pytest.mark.parametrize("volumes, splits", [("npy", "splits"), (".", "."), ("processed", "split_txts")])
def test_bare_reference_folder_is_read_with_synapse_defaults(tmp_path, volumes, splits):
    (tmp_path / volumes).mkdir(exist_ok=True)
    (tmp_path / splits).mkdir(exist_ok=True)
    np.save(tmp_path / volumes / "0001_image.npy", np.zeros((4, 5, 6)))  # float64, as some scripts save
    np.save(tmp_path / volumes / "0001_label.npy", np.ones((4, 5, 6), dtype=np.int8))
    (tmp_path / splits / "labeled_20p.txt").write_text("0001\n\n")

    with pytest.warns(UserWarning, match="no dataset.json; assuming Synapse's 14 classes"):
        info = read_dataset_info(tmp_path)
    assert info["num_classes"] == 14 and info["class_names"] == SYNAPSE_NAMES and info["window"] == [-75, 275]
    assert read_split(tmp_path, "labeled_20p") == ["0001"]
    assert load_image(tmp_path, "0001").dtype == np.float32
    assert load_label(tmp_path, "0001").sum() == 120


def test_read_split_errors_name_the_file_and_problem(tmp_path, rng):
    write_case(tmp_path, "a", *synthetic_case(rng), None)
    write_split(tmp_path, "train", ["a"])
    with pytest.raises(InputError, match=r"splits/eval.txt: split file not found \(splits available: train\)"):
        read_split(tmp_path, "eval")
    write_split(tmp_path, "test", ["a", "ghost"])
    with pytest.raises(InputError, match=r"test.txt: names unknown case 'ghost'"):
        read_split(tmp_path, "test")
    write_split(tmp_path, "empty", [])
    with pytest.raises(InputError, match="lists no case"):
        read_split(tmp_path, "empty")


def test_missing_and_broken_files_raise_input_error(tmp_path, rng):
    with pytest.raises(InputError, match="data set folder not found"):
        read_dataset_info(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no prepared volumes"):
        list_cases(tmp_path / "empty")
    write_case(tmp_path, "a", *synthetic_case(rng), None)
    with pytest.raises(InputError, match="b_image.npy: file not found"):
        load_image(tmp_path, "b")
    (tmp_path / "npy" / "c_image.npy").write_text("garbage")
    with pytest.raises(InputError, match="c_image.npy: not a readable .npy array"):
        load_image(tmp_path, "c")
    np.save(tmp_path / "npy" / "d_image.npy", np.zeros((3, 4)))
    with pytest.raises(InputError, match=r"d_image.npy: has shape \(3, 4\); expected a 3-D"):
        load_image(tmp_path, "d")
    (tmp_path / "dataset.json").write_text(json.dumps({"class_names": ["background", "liver"], "num_classes": 3}))
    with pytest.raises(InputError, match="num_classes 3 but 2 class_names"):
        read_dataset_info(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="dataset.json: not readable JSON"):
        read_dataset_info(tmp_path)


def test_staged_output_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_output_dir(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with staged_output_dir(out) as staging:
        (staging / "done.txt").write_text("done")
    assert [p.name for p in out.iterdir()] == ["done.txt"]
    with pytest.raises(InputError, match="already exists and is not empty"):
        with staged_output_dir(out):
            pass
    with staged_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
