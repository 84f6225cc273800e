"""`skcdf ablate`: rows, shared runs, the table, and resuming after an interruption."""

from __future__ import annotations

import csv
import json

import pytest

import skcdf.ablate as ablate
import skcdf.train.trainer as trainer
from skcdf.ablate import AblationRow, plan_rows, run_ablation
from skcdf.report import load_summary
from skcdf.train.config import load_config
from tests.conftest import TINY_SETTINGS


def test_plan_rows_share_runs_and_drop_duplicate_experiments():
    rows = plan_rows(["df", "full"], ema_orders=True, decoders=True, mask_modes=True)
    titles = [row.title for row in rows]
    assert titles[:2] == ["+ DF", "SKCDF"]
    # "SKCDF, EMA Hl,D,Hu" is the full variant again, so it is not run twice
    assert not any("EMA Hl,D,Hu" in t for t in titles)
    labeled = next(row for row in rows if row.decoder == "labeled" and row.run_name == "full")
    assert labeled.title == "SKCDF, labeled decoder" and not labeled.tta  # Table 4 reuses the full run
    assert len({(row.run_name, row.rule) for row in rows}) == len(rows)
    # every variant with two decoders gets the six test-time rules, its own row being the first
    for run in ("df", "full"):
        assert sorted(row.rule for row in rows if row.run_name == run) == sorted(
            ["unlabeled", "labeled", "mean", "unlabeled-tta", "labeled-tta", "mean-tta"])
    assert [row.title for row in plan_rows(["labeled_only"], decoders=True)][1:] == [
        "SKCDF, unlabeled decoder", "SKCDF, labeled decoder", "SKCDF, decoder mean",
        "SKCDF, unlabeled decoder + flip TTA", "SKCDF, labeled decoder + flip TTA", "SKCDF, decoder mean + flip TTA",
        "Labeled only (VNet), flip TTA"]  # none has two decoders: SKCDF's six; one decoder: its rule and flip TTA
    rows = plan_rows(["cps"], decoders=True, controls=True)  # a Table 1 method and its control: one decoder each
    assert [(row.run_name, row.rule, row.title) for row in rows if row.run_name.startswith("cps")] == [
        ("cps", "unlabeled", "CPS"), ("cps_method_weight-0", "unlabeled", "CPS, no unlabeled term"),
        ("cps", "unlabeled-tta", "CPS, flip TTA"),
        ("cps_method_weight-0", "unlabeled-tta", "CPS, no unlabeled term, flip TTA")]
    assert {row.run_name for row in rows} == {"cps", "cps_method_weight-0", "full"}  # SKCDF's rules, not its control
    # with --controls the control gets the six rules too, so that each side chooses its own
    rows = plan_rows(["full"], decoders=True, controls=True)
    assert [(row.run_name, row.rule) for row in rows[:2]] == [("full", "unlabeled"), ("full_lambda_u-0", "unlabeled")]
    assert rows[1].title == "SKCDF, no unlabeled term" and len(rows) == 12
    assert sorted(row.rule for row in rows if row.run_name == "full_lambda_u-0") == sorted(
        ["unlabeled", "labeled", "mean", "unlabeled-tta", "labeled-tta", "mean-tta"])
    assert rows[-1].title == "SKCDF, no unlabeled term, decoder mean + flip TTA"
    assert AblationRow("x", {"variant": "full", "ema_order": "D,Hl,Hu"}).run_name == "full_ema_order-D-Hl-Hu"
    assert ablate.variant_name("full", "mean-tta") == "full@mean-decoder+tta"
    assert ablate.variant_name("full", "labeled") == "full@labeled-decoder"  # as before the rules


def test_test_time_rules_come_from_one_checkpoint_and_the_validation_split_chooses(tiny_phantom, tmp_path,
                                                                                   monkeypatch):
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY_SETTINGS, "epochs": 1}.items()]
    rows = plan_rows(["labeled_only", "full"], decoders=True)
    trained = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda config, data, out, **kw: trained.append(out) or
                        real_train(config, data, out, **kw))
    run_ablation("phantom", tiny_phantom, tmp_path, rows, seeds=[0], overrides=overrides)
    assert len(trained) == 2  # SKCDF's six rules and labeled-only's two, one run each
    with (tmp_path / "test_time_rules.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert sorted((line["run"], line["rule"]) for line in lines) == sorted((row.run_name, row.rule) for row in rows)
    assert [line["rule"] for line in lines if line["run"] == "labeled_only"] == ["unlabeled", "unlabeled-tta"]
    for line in lines:  # each rule scored on both splits, from the same checkpoint
        run = tmp_path / line["run"] / "seed0"
        for split, folder in (("val_dice", "val"), ("test_dice", "eval")):
            summary = load_summary(run / f"{folder}-{line['rule']}" / "summary.json")
            assert float(line[split]) == pytest.approx(summary["average"]["dice"], abs=1e-4)
        assert load_summary(run / f"val-{line['rule']}" / "summary.json")["split"] == "eval"
    for run in ("labeled_only", "full"):  # one choice per run: its best rule on validation
        own = [line for line in lines if line["run"] == run]
        best = max(own, key=lambda line: float(line["val_dice"]))
        assert [line["chosen"] for line in own].count("1") == 1 and best["chosen"] == "1"
    assert "✓" in (tmp_path / "test_time_rules.md").read_text()
    # every comparison is against labeled-only under the rule its validation chose
    reference = next(line for line in lines if line["run"] == "labeled_only" and line["chosen"] == "1")
    with (tmp_path / "comparison.csv").open() as handle:
        compared = [line for line in csv.DictReader(handle) if line["group"] == "all"]
    assert len(compared) == 7 and all(float(line["dice_a"]) == pytest.approx(float(reference["test_dice"]), abs=1e-3)
                                      for line in compared)


class Interrupted(Exception):
    """Stands for Ctrl-C (a real KeyboardInterrupt would stop pytest itself)."""


def test_controls_follow_each_semi_supervised_method_and_train_it_without_the_unlabeled_term(tmp_path, monkeypatch):
    rows = plan_rows(["labeled_only", "cps", "full"], controls=True)
    assert [(row.title, row.run_name) for row in rows] == [
        ("Labeled only (VNet)", "labeled_only"), ("CPS", "cps"), ("CPS, no unlabeled term", "cps_method_weight-0"),
        ("SKCDF", "full"), ("SKCDF, no unlabeled term", "full_lambda_u-0")]  # labeled-only has no control
    todo = {}

    def record(preset, data, runs, jobs):
        todo.update(runs)
        raise Interrupted

    monkeypatch.setattr(ablate, "train_runs", record)
    with pytest.raises(Interrupted):
        run_ablation("phantom", tmp_path, tmp_path / "abl", rows[1:], seeds=[0],
                     overrides=["method_weight=0.3", "lambda_u=5"], jobs=2)
    settings = {run: load_config("phantom", todo[tmp_path / "abl" / run / "seed0"])
                for run in ("cps", "cps_method_weight-0", "full", "full_lambda_u-0")}
    assert settings["cps_method_weight-0"].method_weight == 0  # the row's setting wins over --set
    assert settings["cps"].method_weight == 0.3
    assert settings["full_lambda_u-0"].lambda_u == 0 and settings["full"].lambda_u == 5


def test_ablation_resumes_after_an_interruption(tiny_phantom, tmp_path, monkeypatch):
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY_SETTINGS, "epochs": 1}.items()]
    rows = plan_rows(["baseline", "df"])
    real_train = trainer.train
    calls: list[str] = []
    interrupt_at_call = [2]

    def interrupted_train(config, data, out, **kwargs):
        calls.append(str(out))
        if len(calls) == interrupt_at_call[0]:
            raise Interrupted  # e.g. Ctrl-C or a lost machine during the second run
        return real_train(config, data, out, **kwargs)

    monkeypatch.setattr(trainer, "train", interrupted_train)
    with pytest.raises(Interrupted):
        run_ablation("phantom", tiny_phantom, tmp_path, rows, seeds=[0], overrides=overrides)
    first = tmp_path / "baseline" / "seed0" / "eval-unlabeled" / "summary.json"
    first_written = first.stat().st_mtime_ns

    calls.clear()
    interrupt_at_call[0] = 0  # no more interruptions
    table = run_ablation("phantom", tiny_phantom, tmp_path, rows, seeds=[0, 1], overrides=overrides)
    # the finished run is reused; only the interrupted one and the new seed are trained
    assert first.stat().st_mtime_ns == first_written
    assert sorted(calls) == sorted(str(tmp_path / name / "seed") + s for name, s in
                                   (("df", "0"), ("baseline", "1"), ("df", "1")))
    text = table.read_text()
    assert "| Baseline (pseudo-labelling) |" in text and "| + DF |" in text
    # each row is the mean over both seeds of the runs' class-averaged Dice
    dice = [load_summary(tmp_path / "df" / f"seed{s}" / "eval-unlabeled" / "summary.json")["average"]["dice"]
            for s in (0, 1)]
    assert f"{(dice[0] + dice[1]) / 2:.2f} ±" in text
    with (tmp_path / "ablation.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert [(line["variant"], line["seed"]) for line in lines] == [("baseline", "0"), ("baseline", "1"),
                                                                    ("df", "0"), ("df", "1")]
    assert list(lines[0])[:5] == ["variant", "seed", "iterations", "split", "mean_dice"] and "LAG" in lines[0]
    assert all(line["iterations"] == "2" and line["split"] == "test" for line in lines)
    assert [float(line["mean_dice"]) for line in lines[2:]] == pytest.approx(dice, abs=1e-4)


def test_parallel_ablation_trains_in_worker_processes(tiny_phantom, tmp_path):
    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY_SETTINGS, "epochs": 1}.items()]
    rows = plan_rows(["labeled_only", "df"])
    run_ablation("phantom", tiny_phantom, tmp_path, rows, seeds=[0], overrides=overrides, jobs=2,
                 csv_path=tmp_path / "results.csv")
    for name in ("labeled_only", "df"):  # trained by the workers, evaluated here
        assert (tmp_path / name / "seed0" / "last.pt").is_file()
        assert (tmp_path / name / "seed0" / "eval-unlabeled" / "summary.json").is_file()
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 3
    # the paired comparison: + DF against labeled-only, over the test cases, one line per group of classes
    with (tmp_path / "comparison.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert [(line["method_b"], line["method_a"], line["group"]) for line in lines] == [
        ("+ DF", "Labeled only (VNet)", group) for group in ("all", "large", "small")]
    assert lines[2]["classes"].split() == ["Ga", "Es", "PSV", "Pa", "RAG", "LAG"]  # the phantom's smallest
    assert "| + DF vs Labeled only (VNet) | all classes |" in (tmp_path / "comparison.md").read_text()
