"""`skcdf prepare --spacing`: cases keep their own extent at one spacing; statistics; refused inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf.cli import main
from skcdf.data.layout import load_geometry, load_image, load_label, read_dataset_info, read_split
from skcdf.data.prepare import prepare_dataset
from skcdf.utils import InputError
from tests.dicom_series import write_series

from .conftest import synthetic_case, write_volume
from .test_prepare import _fails_cleanly, _nnunet_folder


def _varied_folder(src, rng, shapes, spacings):
    """imagesTr/labelsTr cases c0.. of the given (D, H, W) shapes and (x, y, z) spacings."""
    arrays = {}
    for i, (shape, spacing) in enumerate(zip(shapes, spacings)):
        image, label = synthetic_case(rng, shape)
        write_volume(src / "imagesTr" / f"c{i}_0000.nii.gz", image, spacing=spacing, origin=(10.0, -4.0, 7.5))
        write_volume(src / "labelsTr" / f"c{i}.nii.gz", label, spacing=spacing, origin=(10.0, -4.0, 7.5))
        arrays[f"c{i}"] = image, label
    names = ["background"] + [f"organ {k}" for k in range(1, 14)]
    (src / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                  "labels": {n: v for v, n in enumerate(names)}}))
    return arrays


def test_cases_keep_their_extent_at_the_given_spacing(tmp_path, rng):
    shapes = [(12, 21, 24), (18, 15, 30), (9, 27, 27), (15, 21, 21)]
    arrays = _varied_folder(tmp_path / "src", rng, shapes, [(1.0, 1.0, 1.0)] * 4)
    out = prepare_dataset("nifti", tmp_path / "src", tmp_path / "out", spacing=(3.0, 3.0, 3.0),
                          split_counts=(2, 1, 1), labeled_percent=50, workers=1)
    info = read_dataset_info(out)
    assert info["size"] is None and info["spacing"] == [3.0, 3.0, 3.0]
    for case, (image, label) in arrays.items():
        # voxel centres 3i + 1 of the raw grid: the prepared volume is every third raw voxel
        assert np.allclose(load_image(out, case), image[1::3, 1::3, 1::3], atol=1e-4)
        assert np.array_equal(load_label(out, case), label[1::3, 1::3, 1::3])
        assert load_geometry(out, case).size == tuple(reversed(image.shape))
    labeled = read_split(out, "labeled_50p")
    pooled = np.concatenate([arrays[c][0][arrays[c][1] > 0] for c in labeled]).astype(np.float64)
    assert info["intensity"]["mean"] == pytest.approx(pooled.mean(), rel=1e-5)
    assert info["intensity"]["std"] == pytest.approx(pooled.std(), rel=1e-5)


def test_auto_spacing_is_the_median_of_the_training_cases(tmp_path, rng):
    spacings = [(0.8, 0.8, 2.0), (0.7, 0.7, 1.0), (0.9, 0.9, 3.0), (1.0, 1.0, 5.0), (0.6, 0.6, 9.0)]
    _varied_folder(tmp_path / "src", rng, [(10, 12, 12)] * 5, spacings)
    out = prepare_dataset("nifti", tmp_path / "src", tmp_path / "out", spacing="auto", split_counts=(3, 1, 1),
                          workers=1)
    held_out = set(read_split(out, "eval") + read_split(out, "test"))
    training = [s for i, s in enumerate(spacings) if f"c{i}" not in held_out]
    assert read_dataset_info(out)["spacing"] == pytest.approx(np.median(training, axis=0).tolist())


def test_bad_inputs_on_the_spacing_path_fail_with_one_message_and_no_output(tmp_path, rng):
    src = tmp_path / "src"
    _nnunet_folder(src, rng)
    spacing = {"spacing": (1.0, 1.0, 1.0)}
    write_volume(src / "imagesTr" / "c3_0000.nii.gz", synthetic_case(rng, (12, 21, 24))[0], spacing=(1, 1, 15))
    _fails_cleanly(tmp_path, src, r"c3_0000.nii.gz: spacing 15 mm along z is 15x the target", **spacing)
    write_volume(src / "imagesTr" / "c3_0000.nii.gz", np.zeros((1, 21, 24), np.float32))
    write_volume(src / "labelsTr" / "c3.nii.gz", np.zeros((1, 21, 24), np.uint8))
    _fails_cleanly(tmp_path, src, r"c3_0000.nii.gz: is a 2-D image", **spacing)
    write_volume(src / "imagesTr" / "c3_0000.nii.gz", np.zeros((12, 21, 24), np.float32))
    _fails_cleanly(tmp_path, src, r"c3.nii.gz: label grid does not match image", **spacing)
    _fails_cleanly(tmp_path, src, r"--spacing: spacing must be three positive finite numbers",
                   spacing=(1.0, 0.0, 1.0))


def test_a_data_set_mixing_ct_and_mr_series_is_refused(tmp_path, rng):
    src = tmp_path / "src"
    _nnunet_folder(src, rng, cases=4)
    for case, modality in (("c0", "CT"), ("c1", "MR")):
        (src / "imagesTr" / f"{case}_0000.nii.gz").unlink()
        image = sitk.GetImageFromArray(np.full((12, 21, 24), 40, np.int16))
        write_series(image, src / "imagesTr" / case, modality=modality)
    _fails_cleanly(tmp_path, src, r"mixes modalities \(.*c0 is CT, .*c1 is MR\)", spacing=(1.0, 1.0, 1.0),
                   window=None)


def test_cli_spacing_option(tmp_path, rng, capsys):
    _nnunet_folder(tmp_path / "src", rng)
    status = main(["prepare", "nifti", str(tmp_path / "src"), str(tmp_path / "out"), "--spacing", "2", "x",
                   "--split-counts", "2", "1", "1", "--workers", "1"])
    assert status == 2 and "--spacing: expected auto or three numbers" in capsys.readouterr().err
    assert main(["prepare", "nifti", str(tmp_path / "src"), str(tmp_path / "out"), "--spacing", "3", "3", "3",
                 "--split-counts", "2", "1", "1", "--workers", "1"]) == 0
    assert load_image(tmp_path / "out", "c0").shape == (4, 7, 8)


def test_amos_with_its_mri_scans_is_refused_on_the_spacing_path(tmp_path, rng):
    src = tmp_path / "amos"
    for number in (1, 2, 3, 4, 501):
        image, label = synthetic_case(rng, (12, 21, 24), num_classes=16)
        write_volume(src / "imagesTr" / f"amos_{number:04d}.nii.gz", image)
        write_volume(src / "labelsTr" / f"amos_{number:04d}.nii.gz", label)
    before = set(tmp_path.iterdir())
    with pytest.raises(InputError, match=r"amos: modality 'CT\+MRI': .* mixing CT and MRI"):
        prepare_dataset("amos", src, tmp_path / "out", spacing=(1.0, 1.0, 1.0), include_mri=True,
                        split_counts=(3, 1, 1), labeled_percent=50, workers=1)
    assert set(tmp_path.iterdir()) == before
