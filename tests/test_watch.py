"""`skcdf watch` against a real Orthanc: new CT series get a SEG back, a bad one is logged and
skipped, a restart does nothing twice and misses nothing; a series still arriving is left alone."""

from __future__ import annotations

import json

import pydicom
import pytest

from skcdf.cli import main
from skcdf.segmenter import Segmenter
from skcdf.watch import Watcher, WatchState
from tests.dicom_series import write_series
from tests.orthanc import free_port
from tests.scans import box_scan


def arrive(pacs, folder, **options) -> str:
    """A CT series written into ``folder`` and sent to the server; returns its SeriesInstanceUID."""
    files = write_series(box_scan(), folder, **options)
    pacs.upload(files)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def referenced_series(pacs) -> set[str]:
    """The source series of every SEG on the server."""
    segs = [pacs.instance(s["Instances"][0]) for s in pacs.series_of_modality("SEG")]
    return {seg.ReferencedSeriesSequence[0].SeriesInstanceUID for seg in segs}


def watch_once(run, pacs, state) -> list[str]:
    return ["watch", str(run), "--dicomweb", pacs.dicomweb, "--state", str(state), "--once", "--settle", "0"]


def test_new_series_get_a_seg_a_bad_one_is_skipped_and_a_restart_does_nothing_twice(pacs, run_folder, tmp_path,
                                                                                   capsys):
    run, _ = run_folder
    state = tmp_path / "state.json"
    good = [arrive(pacs, tmp_path / "a"), arrive(pacs, tmp_path / "b")]
    bad = arrive(pacs, tmp_path / "bad", skip=(11,))  # a slice missing

    assert main(watch_once(run, pacs, state)) == 1  # one series failed

    err = capsys.readouterr().err
    assert "Traceback" not in err and "1 slice(s) missing between slices 10 and 11" in err
    assert referenced_series(pacs) == set(good)
    recorded = json.loads(state.read_text())["series"]
    assert {uid: entry["status"] for uid, entry in recorded.items()} == {good[0]: "stored", good[1]: "stored",
                                                                         bad: "failed"}
    assert "slice(s) missing" in recorded[bad]["message"]

    assert main(watch_once(run, pacs, state)) == 0  # the restart: nothing new
    assert "no new CT series" in capsys.readouterr().err
    assert len(pacs.series_of_modality("SEG")) == 2

    late = arrive(pacs, tmp_path / "late")  # arrived while the watcher was down
    assert main(watch_once(run, pacs, state)) == 0
    assert referenced_series(pacs) == {*good, late} and len(pacs.series_of_modality("SEG")) == 3


def test_a_series_is_taken_once_its_instance_count_has_settled(pacs, run_folder, tmp_path):
    run, _ = run_folder
    now = [0.0]
    lines: list[str] = []
    watcher = Watcher(Segmenter.load(run, device="cpu"), pacs.dicomweb, WatchState(tmp_path / "state.json"),
                      settle=5, log=lines.append, clock=lambda: now[0])
    files = write_series(box_scan(), tmp_path / "ct")
    pacs.upload(files[:10])  # still arriving

    assert watcher.poll() == 0
    now[0] = 4.0
    pacs.upload(files[10:])
    assert watcher.poll() == 0  # the count changed: wait again
    now[0] = 8.0
    assert watcher.poll() == 0  # unchanged for 4 s only
    now[0] = 9.0
    assert watcher.poll() == 1
    assert len(pacs.series_of_modality("SEG")) == 1 and "stored as SEG series" in lines[-1]


def test_an_unreachable_server_is_logged_and_tried_again(run_folder, tmp_path, capsys):
    run, _ = run_folder
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert main(["watch", str(run), "--dicomweb", url, "--state", str(tmp_path / "s.json"),
                 "--max-polls", "2", "--interval", "0"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("cannot reach the DICOMweb server (connection refused); trying again") == 2
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("content, message", [("{", "not a watch state file"), ("[]", "not a watch state file")])
def test_a_broken_state_file_is_one_line(run_folder, tmp_path, capsys, content, message):
    run, _ = run_folder
    (tmp_path / "s.json").write_text(content)
    assert main(["watch", str(run), "--dicomweb", "http://127.0.0.1:9/dicom-web", "--state",
                 str(tmp_path / "s.json"), "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 's.json'}: {message}") and err.count("\n") == 1
