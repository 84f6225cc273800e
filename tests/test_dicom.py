"""DICOM series in (geometry, series choice, bad series) and DICOM SEG out, on synthetic series."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from highdicom.color import CIELabColor
from matplotlib.colors import to_rgb
from scipy import ndimage

from skcdf import dicom, infer, predict
from skcdf.cli import main
from skcdf.data.classes import SYNAPSE_NAMES
from skcdf.data.layout import load_geometry, load_image
from skcdf.utils import InputError
from skcdf.viz import organ_colour
from tests.dicom_series import write_series
from tests.scans import PREPROCESSING, ThresholdToy, box_scan, rotation


def flipped_stack(scan: sitk.Image) -> sitk.Image:
    """``scan`` with its slices stacked against the slice normal (a left-handed direction matrix)."""
    direction = np.array(scan.GetDirection()).reshape(3, 3)
    direction[:, 2] *= -1
    flipped = sitk.Image(scan)
    flipped.SetDirection(tuple(direction.ravel()))
    return flipped


def assert_same_grid(image: sitk.Image, expected: sitk.Image) -> None:
    assert image.GetSize() == expected.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-5)


@pytest.mark.parametrize("reverse_files", [False, True])
def test_series_is_read_in_its_geometry_whatever_the_file_order(tmp_path, reverse_files):
    scan = box_scan()
    write_series(scan, tmp_path / "series", reverse_files=reverse_files)

    image, series = dicom.read_series(tmp_path / "series", expect_ct=True)

    assert_same_grid(image, scan)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(scan))
    assert series.modality == "CT" and len(series.files) == scan.GetSize()[2]
    # files[k] is slice k of the volume, whatever the names on disk say
    positions = [pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in series.files]
    expected = [scan.TransformIndexToPhysicalPoint((0, 0, k)) for k in range(scan.GetSize()[2])]
    np.testing.assert_allclose(np.array(positions, float), expected, atol=1e-4)


def test_slices_stacked_against_the_normal_are_read_along_it(tmp_path):
    scan = flipped_stack(box_scan())
    write_series(scan, tmp_path / "series")

    image, _ = dicom.read_series(tmp_path / "series")

    # The same voxels in the same places: GDCM orders the slices along the normal, so the volume
    # comes back reversed along D with its origin at the other end.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(scan)[::-1])
    np.testing.assert_allclose(image.GetOrigin(), scan.TransformIndexToPhysicalPoint((0, 0, scan.GetSize()[2] - 1)), atol=1e-4)
    np.testing.assert_allclose(np.array(image.GetDirection()).reshape(3, 3)[:, 2],
                               -np.array(scan.GetDirection()).reshape(3, 3)[:, 2], atol=1e-5)


@pytest.mark.parametrize("reverse_files, flipped", [(False, False), (True, False), (False, True)])
def test_prediction_of_a_series_overlays_it(tmp_path, reverse_files, flipped):
    scan = flipped_stack(box_scan()) if flipped else box_scan()
    write_series(scan, tmp_path / "ct", reverse_files=reverse_files)

    written = predict.predict_dicom_series(ThresholdToy().eval(), tmp_path / "ct", tmp_path / "out", PREPROCESSING)

    assert written == [tmp_path / "out" / "ct.nii.gz"]
    labels = sitk.ReadImage(str(written[0]))
    image, _ = dicom.read_series(tmp_path / "ct")
    assert_same_grid(labels, image)
    # The bright box is segmented where it is (up to the voxels next to its surface, which the
    # resampling to the training size and back may blur).
    box = sitk.GetArrayFromImage(image) > 0
    predicted = sitk.GetArrayFromImage(labels).astype(bool)
    assert predicted[ndimage.binary_erosion(box)].all()
    assert not predicted[~ndimage.binary_dilation(box)].any()
    if not flipped:  # same grid as the scan itself, so the same labels as predicting the scan
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labels),
                                      sitk.GetArrayFromImage(infer.predict_image(ThresholdToy().eval(), scan, PREPROCESSING)))


def test_the_series_with_most_slices_is_taken_unless_one_is_named(tmp_path):
    scan = box_scan()
    small = sitk.RegionOfInterest(scan, (30, 40, 10), (0, 0, 0))
    write_series(scan, tmp_path / "mixed", series_uid="1.2.826.0.1.3680043.8.498.1")
    for path in write_series(small, tmp_path / "other", series_uid="1.2.826.0.1.3680043.8.498.2"):
        path.rename(tmp_path / "mixed" / f"small_{path.name}")

    assert sorted(dicom.find_series(tmp_path / "mixed")) == ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"]
    with pytest.warns(UserWarning, match=r"mixed holds 2 series; predicting 1\.2\.826\.0\.1\.3680043\.8\.498\.1 "):
        assert dicom.read_series(tmp_path / "mixed")[0].GetSize() == (30, 40, 24)
    image, series = dicom.read_series(tmp_path / "mixed", series_uid="1.2.826.0.1.3680043.8.498.2")
    assert image.GetSize() == (30, 40, 10) and series.series_uid == "1.2.826.0.1.3680043.8.498.2"
    with pytest.raises(InputError, match=r"mixed: no series 9\.9; the folder holds 1\.2"):
        dicom.read_series(tmp_path / "mixed", series_uid="9.9")


def _bad_series(tmp_path, problem: str):
    """A folder holding a series with ``problem``; returns (folder, expected message)."""
    scan, folder = box_scan(), tmp_path / problem
    if problem == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("not DICOM")
        return folder, "no DICOM series found"
    if problem == "orientation":
        write_series(scan, folder, orientations={7: list(np.array(rotation(35, 20)).reshape(3, 3)[:, :2].T.ravel())})
        return folder, "different orientations"
    if problem == "spacing":
        shifted = np.array(scan.TransformIndexToPhysicalPoint((0, 0, 7))) + 0.4 * np.array(scan.GetDirection()).reshape(3, 3)[:, 2]
        write_series(scan, folder, positions={7: shifted})
        return folder, "uneven slice spacing"
    if problem == "missing":
        write_series(scan, folder, skip=(11,))
        return folder, "1 slice\\(s\\) missing between slices 10 and 11"
    if problem == "modality":
        write_series(scan, folder, modality="MR")
        return folder, "modality MR, but the model expects CT"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", ["empty", "orientation", "spacing", "missing", "modality"])
def test_a_bad_series_gets_one_message_naming_the_folder(tmp_path, problem):
    folder, message = _bad_series(tmp_path, problem)
    with pytest.raises(InputError, match=message) as error:
        dicom.read_series(folder, expect_ct=True)
    assert str(error.value).startswith(str(folder))


@pytest.mark.parametrize("problem", ["empty", "missing", "modality"])
def test_cli_refuses_a_bad_series_and_writes_nothing(run_folder, tmp_path, capsys, problem):
    run, _ = run_folder
    folder, message = _bad_series(tmp_path, problem)
    assert main(["predict", str(run), str(folder), str(tmp_path / "out"), "--dicom-seg"]) == 2
    error = capsys.readouterr().err
    assert str(folder) in error and error.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_an_mr_series_is_accepted_by_a_model_without_ct_window(tmp_path):
    write_series(box_scan(), tmp_path / "mr", modality="MR")
    written = predict.predict_dicom_series(ThresholdToy().eval(), tmp_path / "mr", tmp_path / "out",
                                         {**PREPROCESSING, "window": None})
    assert written == [tmp_path / "out" / "mr.nii.gz"]


# ------------------------------------------------------------------------------------------- DICOM SEG


def test_segmentation_reads_back_into_the_same_labels_with_codes_and_colours(tmp_path):
    scan = box_scan()
    write_series(scan, tmp_path / "ct", reverse_files=True)
    _, series = dicom.read_series(tmp_path / "ct")
    labels = np.zeros(scan.GetSize()[::-1], np.uint8)
    labels[2:9, 5:20, 3:12] = 6  # liver
    labels[12:20, 22:35, 14:26] = 2  # right kidney
    labels[10, 0:4, 0:4] = 10  # portal and splenic veins: no SNOMED CT concept of its own
    labels[0, 0, 0] = 13  # left adrenal gland, one voxel on the first slice

    path = dicom.write_segmentation(labels, series, SYNAPSE_NAMES, tmp_path / "out" / "ct.seg.dcm")

    np.testing.assert_array_equal(dicom.read_segmentation(path, series, SYNAPSE_NAMES), labels)
    seg = pydicom.dcmread(path)
    first = pydicom.dcmread(series.files[0], stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files}
    segments = {s.SegmentLabel: s for s in seg.SegmentSequence}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["right kidney", "liver", "portal and splenic veins",
                                                             "left adrenal gland"]
    assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    kidney = segments["right kidney"].SegmentedPropertyTypeCodeSequence[0]
    assert (kidney.CodeValue, kidney.CodingSchemeDesignator) == ("64033007", "SCT")
    assert kidney.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Right"
    assert segments["portal and splenic veins"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "91723000"
    for label, name in ((6, "liver"), (2, "right kidney")):
        colour = CIELabColor.from_dicom_value(segments[name].RecommendedDisplayCIELabValue).to_rgb()
        np.testing.assert_allclose(colour, [255 * c for c in to_rgb(organ_colour(label))], atol=2)


def test_no_segmentation_without_a_predicted_organ(tmp_path):
    write_series(box_scan(), tmp_path / "ct")
    _, series = dicom.read_series(tmp_path / "ct")
    with pytest.warns(UserWarning, match="no organ predicted"):
        assert dicom.write_segmentation(np.zeros((24, 40, 30), np.uint8), series, SYNAPSE_NAMES, tmp_path / "x.dcm") is None
    assert not (tmp_path / "x.dcm").exists()


def test_cli_predicts_a_series_into_nifti_and_a_matching_seg(run_folder, tmp_path):
    run, _ = run_folder
    write_series(box_scan(), tmp_path / "patient1")

    assert main(["predict", str(run), str(tmp_path / "patient1"), str(tmp_path / "out"), "--dicom-seg"]) == 0

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["patient1.nii.gz", "patient1.seg.dcm"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "patient1.nii.gz")))
    assert labels.any()  # some organ predicted (by the tiny random network), so a SEG was written
    _, series = dicom.read_series(tmp_path / "patient1")
    np.testing.assert_array_equal(
        dicom.read_segmentation(tmp_path / "out" / "patient1.seg.dcm", series, ["background", "liver", "spleen"]), labels)


def test_dicom_options_need_a_dicom_series(run_folder, tmp_path, capsys):
    run, _ = run_folder
    sitk.WriteImage(box_scan(), str(tmp_path / "scan.nii.gz"))
    assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(tmp_path / "out"), "--dicom-seg"]) == 2
    assert "need a folder holding a DICOM series" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ skcdf prepare nifti


def test_prepare_nifti_takes_a_dicom_series_folder_in_place_of_an_image(tmp_path):
    scan = box_scan()
    src = tmp_path / "raw"
    write_series(scan, src / "imagesTr" / "case1_0000")
    (src / "labelsTr").mkdir()
    label = sitk.Cast(scan > 0, sitk.sitkUInt8)
    sitk.WriteImage(label, str(src / "labelsTr" / "case1.nii.gz"))
    sitk.WriteImage(scan, str(src / "imagesTr" / "case2_0000.nii.gz"))
    sitk.WriteImage(label, str(src / "labelsTr" / "case2.nii.gz"))

    assert main(["prepare", "nifti", str(src), str(tmp_path / "prepared"), "--size", "16", "32", "32",
                 "--num-classes", "2", "--split-counts", "2", "0", "0", "--labeled-percent", "50", "--workers", "1"]) == 0

    np.testing.assert_allclose(load_image(tmp_path / "prepared", "case1"), load_image(tmp_path / "prepared", "case2"))
    geometry = load_geometry(tmp_path / "prepared", "case1")
    np.testing.assert_allclose(geometry.origin, scan.GetOrigin(), atol=1e-4)
    assert geometry.source == str((src / "imagesTr" / "case1_0000").resolve())


def test_prepare_nifti_names_a_bad_series_folder(tmp_path, capsys):
    src = tmp_path / "raw"
    write_series(box_scan(), src / "imagesTr" / "case1", modality="MR")
    assert main(["prepare", "nifti", str(src), str(tmp_path / "prepared"), "--num-classes", "2", "--workers", "1"]) == 2
    assert f"{src / 'imagesTr' / 'case1'}: series" in capsys.readouterr().err
    assert not (tmp_path / "prepared").exists()


# ------------------------------------------------------------------- inputs that used to end in a traceback


def test_a_seg_of_a_series_without_frame_of_reference_is_one_line_saying_the_nifti_was_written(
        run_folder, tmp_path, capsys):
    run, _ = run_folder
    write_series(box_scan(), tmp_path / "anon", drop=("FrameOfReferenceUID", "SliceThickness"))

    assert main(["predict", str(run), str(tmp_path / "anon"), str(tmp_path / "out"), "--dicom-seg"]) == 2

    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1
    assert f"error: {tmp_path / 'anon'}: series " in err and "has no FrameOfReferenceUID" in err
    assert f"no DICOM SEG written; the labels were written to {tmp_path / 'out' / 'anon.nii.gz'}" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["anon.nii.gz"]


def test_a_series_without_slice_thickness_gets_the_slice_gap_in_its_seg(tmp_path):
    write_series(box_scan(), tmp_path / "ct", drop=("SliceThickness",))
    _, series = dicom.read_series(tmp_path / "ct")
    labels = np.zeros((24, 40, 30), np.uint8)
    labels[3:9, 5:20, 3:12] = 1

    path = dicom.write_segmentation(labels, series, SYNAPSE_NAMES, tmp_path / "ct.seg.dcm")

    measures = pydicom.dcmread(path).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(2.5)
    np.testing.assert_array_equal(dicom.read_segmentation(path, series, SYNAPSE_NAMES), labels)


def test_an_output_that_is_a_file_is_one_line(run_folder, tmp_path, capsys):
    run, _ = run_folder
    sitk.WriteImage(box_scan(), str(tmp_path / "scan.nii.gz"))
    (tmp_path / "taken").write_text("a file")
    for output in (tmp_path / "taken", tmp_path / "taken" / "below"):
        assert main(["predict", str(run), str(tmp_path / "scan.nii.gz"), str(output)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {tmp_path / 'taken'}: exists and is not a folder" + (
            f" (so {output} cannot be created)" if output != tmp_path / "taken" else "") + \
            "; the output must be a folder\n"
    with pytest.raises(InputError, match="exists and is not a folder"):
        predict.predict_path(ThresholdToy().eval(), tmp_path / "scan.nii.gz", tmp_path / "taken", PREPROCESSING)


def test_a_folder_of_two_series_says_which_is_predicted_and_how_to_choose(run_folder, tmp_path, capsys):
    run, _ = run_folder
    scan = box_scan()
    write_series(scan, tmp_path / "study", series_uid="1.2.826.0.1.3680043.8.498.1")
    localiser = sitk.RegionOfInterest(scan, (30, 40, 2), (0, 0, 10))
    for path in write_series(localiser, tmp_path / "scout", series_uid="1.2.826.0.1.3680043.8.498.2"):
        path.rename(tmp_path / "study" / f"scout_{path.name}")

    assert main(["predict", str(run), str(tmp_path / "study"), str(tmp_path / "out")]) == 0

    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning == (f"warning: {tmp_path / 'study'} holds 2 series; predicting 1.2.826.0.1.3680043.8.498.1 "
                       "(24 slices), the one with the most slices; choose another with --series UID (series_uid= "
                       "in Python); the others: 1.2.826.0.1.3680043.8.498.2 (2 slices)")
    assert main(["predict", str(run), str(tmp_path / "study"), str(tmp_path / "out"),
                 "--series", "1.2.826.0.1.3680043.8.498.2"]) == 0
    assert "warning:" not in capsys.readouterr().err
