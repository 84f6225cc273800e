"""`skcdf demo`: the whole job end to end at a tiny size, and a clean Ctrl-C."""

from __future__ import annotations

import csv
import json

import pytest

import skcdf.demo as demo
from skcdf.data.phantom import generate_phantom


def test_demo_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    # A small phantom in place of the default one: the demo reuses the data folder it finds.
    generate_phantom(out / "data", cases=15, shape=(32, 48, 48), labeled_percent=20, workers=1)
    monkeypatch.setattr(demo, "TRIAL_EPOCHS", 2)
    report = demo.run_demo(out, minutes=0.01, device="cpu")  # a 2-epoch trial, then one epoch

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
    # the paired comparison of the two runs over the test cases, with a plain verdict
    test_cases = (out / "data" / "splits" / "test.txt").read_text().split()
    assert "## Paired comparison: SKCDF against labeled-only" in text
    assert f"| SKCDF (phantom) vs Labeled only (phantom) | all classes | {len(test_cases)} |" in text
    assert "smallest organs (Ga, Es, PSV, Pa, RAG, LAG)" in text
    assert "significant at the 5 % level" in text
    assert json.loads((out / "plan.json").read_text())["epochs"] == 1
    for png in ("overlay.png", "curves.png", "curves-labeled-only.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "eval" / "per_case.csv", newline="") as f:
        rows = list(csv.DictReader(f))
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


def test_the_timed_trial_sizes_the_epochs_and_a_resume_keeps_them(tmp_path):
    # 4 epochs at 2 s each, and 12 s of start-up: the trial took 20 s
    trial = demo.Trial(seconds=20.0, seconds_per_epoch=2.0)

    def not_again() -> demo.Trial:
        raise AssertionError("the trial ran again")

    # 120 s of budget: the trial's 20 s are spent and the runs pay the 12 s start-up again
    assert demo.epochs_in_budget(2.0, trial) == (120 - 20 - 12) // 2 == 44
    assert demo.epochs_in_budget(0.1, trial) == 1  # at least one epoch
    assert demo.planned_epochs(tmp_path, 2.0, "cpu", lambda: trial) == 44
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["epochs"] == 44 and plan["trial_seconds"] == 20.0
    assert demo.planned_epochs(tmp_path, 2.0, "cpu", not_again) == 44


def test_epoch_pace_is_read_from_the_training_log_without_the_first_epoch(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("2025-01-01 10:00:00.000 starting epoch 0: variant full\n"
                   "2025-01-01 10:00:09.500 epoch 0: loss 1.0\n"
                   "2025-01-01 10:00:12.000 epoch 1: loss 0.9\n"
                   "2025-01-01 10:00:14.500 epoch 2: loss 0.8, val dice 3.00\n"
                   "2025-01-01 10:00:14.600 finished 3 epochs\n")
    assert demo.epoch_pace(log) == pytest.approx(2.5)
    log.write_text("2025-01-01 10:00:09.500 epoch 0: loss 1.0\n")
    assert demo.epoch_pace(log) is None and demo.epoch_pace(tmp_path / "missing.log") is None


def test_the_timed_trial_trains_both_runs_and_leaves_nothing(tmp_path, tiny_phantom, monkeypatch):
    monkeypatch.setattr(demo, "TRIAL_EPOCHS", 2)
    ticks = iter([100.0, 130.0])  # an injected clock: the trial took 30 s
    settings = ["device=cpu", "labeled_split=labeled_40p", "unlabeled_split=unlabeled_40p"]
    trial = demo._time_trial(tmp_path, tiny_phantom, settings, jobs=1, clock=lambda: next(ticks))
    assert trial.seconds == 30.0
    assert 0 < trial.seconds_per_epoch < 30.0  # from the runs' logs (one after the other: their sum)
    assert not (tmp_path / "trial").exists()
