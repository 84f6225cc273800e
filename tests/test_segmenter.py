"""The Python API: Segmenter.load and Segmenter.predict on a path, a DICOM folder, an image and an array."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from skcdf import Segmenter, infer
from skcdf.checkpoint import load_checkpoint, load_model, save_checkpoint
from skcdf.infer import InferenceSettings
from skcdf.utils import InputError
from tests.dicom_series import write_series
from tests.scans import NET_PREPROCESSING, NUM_CLASSES, box_scan


@pytest.fixture
def segmenter_and_expected(run_folder):
    """A Segmenter loaded from the run, the scan, and the labels predict_image gives for it."""
    run, model = run_folder
    scan = box_scan()
    expected = sitk.GetArrayFromImage(infer.predict_image(model, scan, NET_PREPROCESSING))
    return Segmenter.load(run, device="cpu"), scan, expected


def test_load_keeps_the_checkpoint_preprocessing(run_folder):
    run, _ = run_folder
    segmenter = Segmenter.load(run / "best.pt", settings=InferenceSettings(tta=True))
    assert segmenter.class_names == ["background", "liver", "spleen"]
    assert segmenter.preprocessing["size"] == NET_PREPROCESSING["size"] and segmenter.settings.tta
    assert not segmenter.network.training


def test_the_test_time_rule_of_the_training_configuration_is_the_default(run_folder):
    run, model = run_folder
    assert InferenceSettings().for_model(load_model(run)[1]) == InferenceSettings(decoder="unlabeled", tta=False)
    payload = load_checkpoint(run / "best.pt")
    save_checkpoint(run / "best.pt", {**payload, "config": {"inference_decoder": "mean", "inference_tta": True}})
    preprocessing = load_model(run)[1]
    assert InferenceSettings().for_model(preprocessing) == InferenceSettings(decoder="mean", tta=True)
    assert InferenceSettings(decoder="labeled", tta=False).for_model(preprocessing).tta is False  # asked for: kept
    scan = box_scan()
    chosen = Segmenter.load(run, device="cpu").predict(scan, probabilities=True)[1]
    rule = {**NET_PREPROCESSING, "flips": "reference"}
    mean_tta, unlabeled = (infer.predict_scan(model, scan, rule, settings, probabilities=True).probabilities
                           for settings in (InferenceSettings(decoder="mean", tta=True),
                                            InferenceSettings(decoder="unlabeled", tta=False)))
    np.testing.assert_allclose(chosen, mean_tta, atol=1e-6)
    assert not np.allclose(chosen, unlabeled, atol=1e-4)


def test_predict_an_image_keeps_its_geometry(segmenter_and_expected):
    segmenter, scan, expected = segmenter_and_expected
    labels = segmenter.predict(scan)
    assert isinstance(labels, sitk.Image) and labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == scan.GetSize()
    np.testing.assert_allclose(labels.GetOrigin(), scan.GetOrigin())
    np.testing.assert_allclose(labels.GetDirection(), scan.GetDirection())
    np.testing.assert_allclose(labels.GetSpacing(), scan.GetSpacing())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)


def test_predict_a_file_and_a_dicom_folder(segmenter_and_expected, tmp_path):
    segmenter, scan, expected = segmenter_and_expected
    sitk.WriteImage(scan, str(tmp_path / "scan.mha"))
    write_series(scan, tmp_path / "series", reverse_files=True)
    for path in (tmp_path / "scan.mha", str(tmp_path / "series")):
        labels = segmenter.predict(path)
        np.testing.assert_allclose(labels.GetOrigin(), scan.GetOrigin(), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)


def test_predict_an_array_returns_an_array(segmenter_and_expected):
    segmenter, scan, expected = segmenter_and_expected
    labels = segmenter.predict(sitk.GetArrayFromImage(scan), spacing=scan.GetSpacing()[::-1])
    assert isinstance(labels, np.ndarray) and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)


def test_probabilities_on_request_are_on_the_input_grid(segmenter_and_expected):
    segmenter, scan, expected = segmenter_and_expected
    labels, probabilities = segmenter.predict(sitk.GetArrayFromImage(scan), probabilities=True)
    assert probabilities.shape == (NUM_CLASSES, *expected.shape) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)  # linear resampling keeps the sum
    np.testing.assert_array_equal(probabilities.argmax(0), labels)
    np.testing.assert_array_equal(labels, expected)


@pytest.mark.parametrize("call, message", [
    (lambda s, scan: s.predict(np.zeros((4, 5))), "3-D"),
    (lambda s, scan: s.predict(sitk.Image(8, 8, sitk.sitkFloat32)), "3-D grey-level image, got a 2-D"),
    (lambda s, scan: s.predict(np.zeros((4, 5, 6)), spacing=(1, 0, 1)), "three positive numbers"),
    (lambda s, scan: s.predict(scan, spacing=(1, 1, 1)), "numpy arrays only"),
    (lambda s, scan: s.predict(scan, series_uid="1.2.3"), "DICOM series or a DICOMweb URL only"),
    (lambda s, scan: s.predict("/nonexistent/scan.nii.gz"), "/nonexistent/scan.nii.gz: file not found"),
])
def test_bad_input_is_refused_clearly(segmenter_and_expected, call, message):
    segmenter, scan, _ = segmenter_and_expected
    with pytest.raises(InputError, match=message):
        call(segmenter, scan)
