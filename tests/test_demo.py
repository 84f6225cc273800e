"""`skcdf demo`: the whole job end to end at a tiny size, and a clean Ctrl-C."""

from __future__ import annotations

import csv
import json

import skcdf.demo as demo
from skcdf.data.phantom import generate_phantom


def test_demo_runs_end_to_end_and_resumes(tmp_path):
    out = tmp_path / "demo"
    # A small phantom in place of the default one: the demo reuses the data folder it finds.
    generate_phantom(out / "data", cases=15, shape=(32, 48, 48), labeled_percent=20, workers=1)
    report = demo.run_demo(out, minutes=0.01, device="cpu")  # one epoch

    text = report.read_text()
    for link in ("overlay.png", "curves.png", "curves-labeled-only.png", "eval/per_case.csv",
                 "eval-labeled-only/per_case.csv"):
        assert f"({link})" in text and (out / link).is_file()
    assert "| SKCDF (phantom) |" in text and "| Labeled only (phantom) |" in text and "skcdf predict" in text
    # the report compares the two runs at the same budget, with the numbers of their evaluations
    dice = {name: json.loads((out / name / "summary.json").read_text())["average"]["dice"]
            for name in ("eval", "eval-labeled-only")}
    assert f"SKCDF's mean Dice is {dice['eval']:.2f} %" in text
    assert f"labeled-only's {dice['eval-labeled-only']:.2f} %" in text
    for run in ("run", "run-labeled-only"):  # both trained for the same number of iterations
        with open(out / run / "metrics.csv", newline="") as f:
            assert f"each for {list(csv.DictReader(f))[-1]['iteration']} iterations" in text
    for png in ("overlay.png", "curves.png", "curves-labeled-only.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    test_cases = (out / "data" / "splits" / "test.txt").read_text().split()
    assert len(rows) == len(test_cases) * 13  # one row per test case and organ

    # Running it again reuses the data and the finished run: no checkpoint is rewritten.
    checkpoints = [out / "run" / "last.pt", out / "run-labeled-only" / "last.pt"]
    written = [checkpoint.stat().st_mtime_ns for checkpoint in checkpoints]
    assert demo.run_demo(out, minutes=0.01, device="cpu") == report
    assert [checkpoint.stat().st_mtime_ns for checkpoint in checkpoints] == written


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert demo.main_cli(str(tmp_path / "d"), 3.0, 0, "cpu") == 130
    assert f"skcdf demo --out {tmp_path / 'd'} --minutes 3" in capsys.readouterr().err


def test_on_a_gpu_a_timed_trial_sizes_the_epochs_and_a_resume_keeps_them(tmp_path):
    def timed() -> float:
        return 0.5  # seconds per epoch of the two runs side by side

    def not_again() -> float:
        raise AssertionError("the trial ran again")

    assert demo.planned_epochs(tmp_path, 2.0, "cuda", 150, timed) == 240  # 120 s / 0.5 s
    assert json.loads((tmp_path / "plan.json").read_text())["epochs"] == 240
    assert demo.planned_epochs(tmp_path, 2.0, "cuda", 150, not_again) == 240
    # On the CPU the preset's epochs scale with the minutes; nothing is timed or saved.
    assert demo.planned_epochs(tmp_path / "cpu", demo.PRESET_MINUTES / 2, "cpu", 150, not_again) == 75
    assert not (tmp_path / "cpu" / "plan.json").exists()


def test_the_timed_trial_trains_both_runs_and_leaves_nothing(tmp_path, tiny_phantom, monkeypatch):
    monkeypatch.setattr(demo, "TRIAL_EPOCHS", 1)
    seconds = demo._time_trial(tmp_path, tiny_phantom, ["device=cpu", "labeled_split=labeled_40p", "unlabeled_split=unlabeled_40p"], jobs=1)
    assert seconds > 0
    assert not (tmp_path / "trial").exists()
