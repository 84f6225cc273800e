"""DICOMweb in and out against a real Orthanc: predict by URL, store the SEG back, query it again;
URL parsing and credentials; each failure of the server as one line."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient

from skcdf import dicom
from skcdf.cli import main
from skcdf.dicomweb import (ENV_PASSWORD, ENV_TOKEN, ENV_USER, DicomWebError, DicomWebLocation, DicomWebServer,
                            make_session, parse_url)
from skcdf.segmenter import Segmenter
from skcdf.utils import InputError
from tests.dicom_series import write_series
from tests.orthanc import FORBIDDEN_USER, PASSWORD, READ_ONLY_USER, REJECTED_PATIENT, USER, free_port
from tests.scans import box_scan

NAMES = ["background", "liver", "spleen"]  # the run_folder model's classes


def upload_series(pacs, folder: Path, **options) -> tuple[str, str]:
    """Write a box scan as a DICOM series into ``folder``, upload it; returns (study UID, series UID)."""
    files = write_series(options.pop("scan", None) or box_scan(), folder, **options)
    pacs.upload(files)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    return str(header.StudyInstanceUID), str(header.SeriesInstanceUID)


def series_url(pacs, study: str, series: str | None = None) -> str:
    return str(DicomWebLocation(pacs.dicomweb, study, series))


def one_error_line(capsys) -> str:
    """The single ``error:`` line of a CLI run (asserting there is one and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------- no server


def test_urls_split_into_service_study_and_series():
    assert parse_url("http://h:8042/dicom-web/studies/1.2.3/series/4.5/") == DicomWebLocation(
        "http://h:8042/dicom-web", "1.2.3", "4.5")
    assert parse_url("https://pacs/wado/studies/1.2") == DicomWebLocation("https://pacs/wado", "1.2", None)
    assert parse_url("http://h:8042/dicom-web/") == DicomWebLocation("http://h:8042/dicom-web")
    assert str(DicomWebLocation("http://h/dw", "1.2", "3.4")) == "http://h/dw/studies/1.2/series/3.4"
    with pytest.raises(InputError, match="numeric UIDs"):
        parse_url("http://h/dicom-web/studies/abc")


def test_credentials_in_the_url_are_refused_without_showing_them():
    with pytest.raises(InputError, match=ENV_USER) as error:
        parse_url("http://alice:hunter2@127.0.0.1:8042/dicom-web/studies/1.2")
    assert "hunter2" not in str(error.value) and str(error.value).startswith("http://127.0.0.1:8042/dicom-web")


def _authorization(session: requests.Session) -> str | None:
    return session.prepare_request(requests.Request("GET", "http://127.0.0.1:9/dicom-web/studies")).headers.get(
        "Authorization")


def test_credentials_come_from_the_environment_or_netrc(tmp_path, monkeypatch):
    basic = "Basic " + base64.b64encode(b"alice:secret").decode()
    assert _authorization(make_session({ENV_TOKEN: "t0k"})) == "Bearer t0k"
    assert _authorization(make_session({ENV_USER: "alice", ENV_PASSWORD: "secret"})) == basic
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login alice password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert _authorization(make_session({})) == basic
    assert _authorization(make_session({ENV_TOKEN: "t0k"})) == "Bearer t0k"  # the token wins over netrc
    with pytest.raises(InputError, match="set one of them"):
        make_session({ENV_TOKEN: "t", ENV_USER: "u", ENV_PASSWORD: "p"})
    with pytest.raises(InputError, match=f"{ENV_PASSWORD} is not"):
        make_session({ENV_USER: "u"})


def test_store_needs_a_url(run_folder, tmp_path, capsys):
    run, _ = run_folder
    write_series(box_scan(), tmp_path / "ct")
    assert main(["predict", str(run), str(tmp_path / "ct"), str(tmp_path / "out"), "--store"]) == 2
    assert "--store needs the DICOMweb URL" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------- Orthanc


def test_a_series_url_is_predicted_stored_and_queried_back(pacs, run_folder, tmp_path, capsys):
    run, _ = run_folder
    study, series = upload_series(pacs, tmp_path / "ct", reverse_files=True)

    assert main(["predict", str(run), series_url(pacs, study, series), str(tmp_path / "out"), "--store"]) == 0

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"{series}.nii.gz", f"{series}.seg.dcm"]
    assert "stored" in capsys.readouterr().out
    client = DICOMwebClient(pacs.dicomweb, session=make_session())
    found = client.search_for_series(study, search_filters={"Modality": "SEG"})
    assert len(found) == 1  # a new series in the same study
    seg_series = found[0]["0020000E"]["Value"][0]
    (seg,) = client.retrieve_series(study, seg_series)
    source = pydicom.dcmread(tmp_path / "ct" / "slice_001.dcm", stop_before_pixels=True)
    assert seg.StudyInstanceUID == study and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    seg.save_as(tmp_path / "back.seg.dcm")
    _, local = dicom.read_series(tmp_path / "ct")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{series}.nii.gz")))
    assert labels.any()
    np.testing.assert_array_equal(dicom.read_segmentation(tmp_path / "back.seg.dcm", local, NAMES), labels)


def test_a_study_url_takes_its_largest_ct_series_and_says_so(pacs, run_folder, tmp_path, recwarn):
    run, _ = run_folder
    study, venous = upload_series(pacs, tmp_path / "venous")
    localiser = sitk.RegionOfInterest(box_scan(), (30, 40, 3), (0, 0, 10))
    _, scout = upload_series(pacs, tmp_path / "scout", scan=localiser, study_uid=study)
    upload_series(pacs, tmp_path / "mr", study_uid=study, modality="MR", scan=box_scan((30, 40, 30)))
    segmenter = Segmenter.load(run, device="cpu")

    labels = segmenter.predict(series_url(pacs, study))

    (warning,) = [str(w.message) for w in recwarn if "series" in str(w.message)]
    assert f"holds 2 series; predicting {venous} (24 slices)" in warning and "--series UID" in warning
    assert f"{scout} (3 slices)" in warning
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels),
                                  sitk.GetArrayFromImage(segmenter.predict(tmp_path / "venous")))
    assert segmenter.predict(series_url(pacs, study), series_uid=scout).GetSize() == (30, 40, 3)
    summary = segmenter.predict_to(series_url(pacs, study, venous), tmp_path / "out")
    assert [p.name for p in summary.written] == [f"{venous}.nii.gz"]


def test_netrc_credentials_reach_the_server(pacs, run_folder, tmp_path, monkeypatch):
    run, _ = run_folder
    study, series = upload_series(pacs, tmp_path / "ct")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.delenv(ENV_USER)
    monkeypatch.delenv(ENV_PASSWORD)
    assert main(["predict", str(run), series_url(pacs, study, series), str(tmp_path / "out")]) == 0


def _bad_case(case: str, pacs, tmp_path, monkeypatch) -> tuple[str, str, bool]:
    """Set up a failing ``skcdf predict URL``: returns (URL, expected message with … for any text, whether --store)."""
    if case == "unreachable":
        return f"http://127.0.0.1:{free_port()}/dicom-web/studies/1.2.3", "cannot reach the DICOMweb server", False
    if case == "no such study":
        return series_url(pacs, "1.2.3"), "1.2.3: no such study on the server", False
    if case == "no such series":
        study, _ = upload_series(pacs, tmp_path / "ct")
        return series_url(pacs, study, "9.9"), "/series/9.9: no such series in the study", False
    if case == "no CT series":
        study, _ = upload_series(pacs, tmp_path / "mr", modality="MR")
        return series_url(pacs, study), "the study has no CT series (it holds MR)", False
    study, series = upload_series(pacs, tmp_path / "ct", patient_id=REJECTED_PATIENT)
    url = series_url(pacs, study, series)
    if case == "401":
        monkeypatch.delenv(ENV_USER)
        return url, f"HTTP 401 Unauthorized); set {ENV_USER}", False
    if case == "403":
        monkeypatch.setenv(ENV_USER, FORBIDDEN_USER)
        return url, "refuses this user access (HTTP 403 Forbidden)", False
    if case == "STOW refused":
        monkeypatch.setenv(ENV_USER, READ_ONLY_USER)
        return url, "STOW-RS of …: the server refuses this user access (HTTP 403 Forbidden); written here: ", True
    if case == "STOW dropped":
        return url, "answered success but does not hold the instance …nothing was stored; written here: ", True
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["unreachable", "401", "403", "no such study", "no such series", "no CT series",
                                  "STOW refused", "STOW dropped"])
def test_each_server_failure_is_one_line_and_nothing_is_half_stored(pacs, run_folder, tmp_path, monkeypatch,
                                                                    capsys, case):
    run, _ = run_folder
    url, message, store = _bad_case(case, pacs, tmp_path, monkeypatch)

    assert main(["predict", str(run), url, str(tmp_path / "out")] + ["--store"] * store) == 2

    line = one_error_line(capsys)
    assert line.startswith(f"error: {url.split('/studies/')[0]}")
    assert re.search(".*".join(map(re.escape, message.split("…"))), line), line
    assert PASSWORD not in line
    assert pacs.series_of_modality("SEG") == []


def test_a_stow_the_server_rejects_names_its_status_and_failure_reason(pacs, run_folder, tmp_path):
    run, _ = run_folder
    study, series = upload_series(pacs, tmp_path / "ct")
    Segmenter.load(run, device="cpu").predict_to(series_url(pacs, study, series), tmp_path / "out", dicom_seg=True)
    seg = tmp_path / "out" / f"{series}.seg.dcm"

    # Into another study than the instance's own: Orthanc refuses it with 409 and a FailedSOPSequence.
    with pytest.raises(DicomWebError, match=r"studies/1\.2\.3: STOW-RS of .*seg\.dcm: the server answered HTTP 409 "
                                            r"Conflict, failure reason 0x0110"):
        DicomWebServer(pacs.dicomweb).store(seg, study_uid="1.2.3")
    assert pacs.series_of_modality("SEG") == []
