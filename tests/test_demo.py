"""`skcdf demo`: the whole job end to end at a tiny size, and a clean Ctrl-C."""

from __future__ import annotations

import csv

import skcdf.demo as demo
from skcdf.data.phantom import generate_phantom


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    # A small phantom in place of the default one: the demo reuses the data folder it finds.
    generate_phantom(out / "data", cases=15, shape=(32, 64, 64), labeled_percent=20, workers=1)
    report = demo.run_demo(out, minutes=0.01, device="cpu")  # one epoch

    text = report.read_text()
    for link in ("overlay.png", "curves.png", "eval/per_case.csv"):
        assert f"({link})" in text and (out / link).is_file()
    assert "| SKCDF (phantom) |" in text and "skcdf predict" in text
    for png in ("overlay.png", "curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_cases = (out / "data" / "splits" / "test.txt").read_text().split()
    assert len(rows) == len(test_cases) * 13  # one row per test case and organ

    # Running it again reuses the data and the finished run: no checkpoint is rewritten.
    checkpoint = out / "run" / "last.pt"
    written = checkpoint.stat().st_mtime_ns
    assert demo.run_demo(out, minutes=0.01, device="cpu") == report
    assert checkpoint.stat().st_mtime_ns == written


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert demo.main_cli(str(tmp_path / "d"), 3.0, 0, "cpu") == 130
    assert f"skcdf demo --out {tmp_path / 'd'} --minutes 3" in capsys.readouterr().err
