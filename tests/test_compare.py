"""Paired comparison: the statistics against scipy and numpy, the pairing, the class groups, the CLI."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from skcdf.ablate import ablation_methods, write_ablation_comparison
from skcdf.cli import main
from skcdf.compare import (Method, bootstrap_interval, class_groups, compare, paired_stats, reading, render_csv,
                           render_markdown, training_class_counts, wilcoxon_p)
from skcdf.data.layout import dataset_info, write_case, write_dataset_info, write_split
from skcdf.utils import InputError

# ----------------------------------------------------------------------------- statistics


def test_wilcoxon_p_is_scipys_two_sided_p_and_exact_on_a_hand_made_sample():
    differences = np.array([1.5, -0.4, 2.2, 3.1, 0.7, -1.1, 4.0, 2.6])
    assert wilcoxon_p(differences) == stats.wilcoxon(differences, alternative="two-sided").pvalue
    # all five positive: the exact two-sided p is 2 / 2**5
    assert wilcoxon_p(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(2 / 32)
    # all differences zero: no evidence of a difference (scipy has no statistic then)
    assert wilcoxon_p(np.zeros(6)) == 1.0
    assert math.isnan(wilcoxon_p(np.array([])))


def _numpy_percentile_bootstrap(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """An independent percentile bootstrap of the mean."""
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    return tuple(np.percentile(means, [2.5, 97.5]))


def test_bootstrap_interval_is_seeded_and_agrees_with_an_independent_numpy_bootstrap():
    values = np.random.default_rng(3).normal(2.0, 5.0, 40)
    low, high = bootstrap_interval(values, seed=7)
    assert (low, high) == bootstrap_interval(values, seed=7)  # deterministic
    assert bootstrap_interval(values, seed=8) != (low, high)
    assert low < values.mean() < high
    # the same interval within Monte-Carlo error (10,000 resamples each), and close to the normal one
    ref_low, ref_high = _numpy_percentile_bootstrap(values, 10_000, 123)
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert (low, high) == pytest.approx((ref_low, ref_high), abs=0.1 * half)
    assert (low, high) == pytest.approx((values.mean() - half, values.mean() + half), abs=0.15 * half)
    # shifting every difference shifts the interval
    assert bootstrap_interval(values + 10, seed=7) == pytest.approx((low + 10, high + 10))
    assert bootstrap_interval(np.full(5, 2.5)) == (2.5, 2.5)
    assert all(math.isnan(v) for v in bootstrap_interval(np.array([1.0])))


def test_paired_stats_mean_difference_by_hand():
    a = np.array([50.0, 60.0, 70.0, 80.0])
    b = np.array([52.0, 59.0, 75.0, 84.0])  # differences 2, -1, 5, 4
    result = paired_stats(a, b)
    assert (result.n, result.mean_a, result.mean_b, result.mean_diff) == (4, 65.0, 67.5, 2.5)
    assert result.p_value == stats.wilcoxon(b - a).pvalue
    assert result.ci_low <= 2.5 <= result.ci_high
    with pytest.raises(ValueError):
        paired_stats(a, b[:3])


# ----------------------------------------------------------------------------- groups


def test_the_six_smallest_classes_by_voxels_or_the_smaller_half():
    counts = [10**9] + [900, 800, 700, 5, 4, 1000, 600, 500, 9, 3, 400, 2, 1]  # background, then 13 organs
    groups = class_groups(counts, range(1, 14))
    assert groups["small"] == [4, 5, 9, 10, 12, 13]
    assert groups["large"] == [1, 2, 3, 6, 7, 8, 11]
    assert groups["all"] == list(range(1, 14))
    # fewer than 12 foreground classes: the smaller half (rounded down)
    assert class_groups({1: 30, 2: 10, 3: 20, 4: 40, 5: 50}, [1, 2, 3, 4, 5])["small"] == [2, 3]


def test_training_class_counts_sum_the_labeled_train_cases(tmp_path):
    data = _prepared(tmp_path / "data")
    counts = training_class_counts(data)
    assert counts.tolist() == [64 - 7 - 6 - 5 + 64 - 7 - 6 - 5, 14, 12, 10]


# ----------------------------------------------------------------------------- folders


def _prepared(root: Path) -> Path:
    """A prepared data set of 2 train cases (4×4×4) where class 1 has the most voxels, 3 the fewest."""
    write_dataset_info(root, dataset_info("tiny", ["background", "liver", "spleen", "gallbladder"], None, None,
                                          class_abbrevs=["Bg", "Li", "Sp", "Ga"]))
    label = np.zeros(64, np.uint8)
    label[:7], label[7:13], label[13:18] = 1, 2, 3
    for case in ("c1", "c2"):
        write_case(root, case, np.zeros((4, 4, 4)), label.reshape(4, 4, 4), None)
    write_split(root, "train", ["c1", "c2"])
    return root


def _evaluation(folder: Path, dice: dict[str, list[float]], name: str, gt: Path | str = "gt") -> Path:
    """An evaluation folder: per_case.csv with the given per-class Dice (classes 1..3) and a summary.json."""
    folder.mkdir(parents=True)
    with (folder / "per_case.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "class", "dice", "gt_voxels"])
        for case, values in dice.items():
            writer.writerows([case, label, value, 10 * label] for label, value in enumerate(values, 1))
    summary = {"format": "skcdf-evaluation", "name": name, "gt": str(gt), "classes": [1, 2, 3],
               "class_abbrevs": ["Li", "Sp", "Ga"], "cases": list(dice)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _ablation_evaluations(out: Path, gt: Path, evaluations: list[tuple[str, dict[str, list[float]], str]]) -> None:
    """An ablation folder's evaluations for seeds 0 and 1: (``<run>/eval-<rule>`` path part, Dice, name) each."""
    for seed in (0, 1):
        for folder, dice, name in evaluations:
            run, evaluation = folder.split("/")
            _evaluation(out / run / f"seed{seed}" / evaluation, dice, name, gt=gt)


A_DICE = {"c1": [90.0, 80.0, 10.0], "c2": [85.0, 70.0, 0.0], "c3": [95.0, 75.0, 20.0]}
B_DICE = {"c1": [91.0, 82.0, 30.0], "c2": [86.0, 71.0, 10.0], "c3": [94.0, 78.0, 50.0]}


def test_compare_pairs_cases_and_groups(tmp_path):
    a = Method("A", {"s0": _evaluation(tmp_path / "a", A_DICE, "A")})
    b = Method("B", {"s0": _evaluation(tmp_path / "b", B_DICE, "B")})
    rows = compare(a, b, {"all": [1, 2, 3], "large": [1, 2], "small": [3]}, {1: "Li", 2: "Sp", 3: "Ga"})
    by_group = {row.group: row for row in rows}
    assert by_group["small"].classes == ("Ga",) and by_group["small"].stats.n == 3
    assert by_group["small"].stats.mean_diff == pytest.approx((20 + 10 + 30) / 3)
    assert by_group["large"].stats.mean_diff == pytest.approx((1.5 + 1.0 + 1.0) / 3)
    all_diffs = [np.mean(B_DICE[c]) - np.mean(A_DICE[c]) for c in A_DICE]
    assert by_group["all"].stats.mean_diff == pytest.approx(np.mean(all_diffs))
    assert by_group["all"].stats.p_value == pytest.approx(stats.wilcoxon(all_diffs).pvalue)
    assert "not significant at the 5 % level" in reading(by_group["all"])  # n = 3 cannot reach p < 0.05


def test_each_seed_has_its_own_mean_difference_and_seeds_ahead_counts_the_positive_ones(tmp_path):
    # seed "s1": B is A lowered by 5 points on every class, so B is ahead on seed s0 only
    behind = {case: [value - 5.0 for value in values] for case, values in A_DICE.items()}
    a = Method("A", {"s0": _evaluation(tmp_path / "a0", A_DICE, "A"), "s1": _evaluation(tmp_path / "a1", A_DICE, "A")})
    b = Method("B", {"s0": _evaluation(tmp_path / "b0", B_DICE, "B"), "s1": _evaluation(tmp_path / "b1", behind, "B")})
    rows = {row.group: row for row in compare(a, b, {"all": [1, 2, 3], "small": [3]})}
    seed0 = np.mean([np.mean(B_DICE[c]) - np.mean(A_DICE[c]) for c in A_DICE])
    assert rows["all"].seed_differences == pytest.approx((seed0, -5.0))
    assert rows["all"].stats.n == 6 and rows["all"].stats.mean_diff == pytest.approx((seed0 - 5.0) / 2)
    assert rows["all"].seeds_ahead == 1 and rows["small"].seeds_ahead == 1
    assert rows["small"].seed_differences == pytest.approx((20.0, -5.0))
    assert "| 1/2 |" in render_markdown(list(rows.values()))
    assert "ahead on 1 of 2 seed(s)" in reading(rows["all"])
    line = next(csv.DictReader(io.StringIO(render_csv([rows["all"]]))))
    assert (line["seeds"], line["seeds_ahead"]) == ("2", "1")
    assert [float(v) for v in line["seed_diffs"].split()] == pytest.approx((seed0, -5.0), abs=1e-4)


def test_mismatched_cases_are_an_error_naming_both_folders(tmp_path):
    a = Method("A", {"s0": _evaluation(tmp_path / "a", A_DICE, "A")})
    b_dice = {**B_DICE, "c4": [1.0, 2.0, 3.0]}
    del b_dice["c1"]
    b = Method("B", {"s0": _evaluation(tmp_path / "b", b_dice, "B")})
    with pytest.raises(InputError, match=r"a and .*b do not hold the same cases: only in the first \['c1'\], "
                                         r"only in the second \['c4'\]"):
        compare(a, b, {"all": [1, 2, 3]})
    with pytest.raises(InputError, match="share no seed"):
        compare(a, Method("B", {"s1": tmp_path / "b"}), {"all": [1, 2, 3]})


def test_cli_compares_two_folders_with_groups_from_the_data_set(tmp_path, capsys):
    data = _prepared(tmp_path / "data")
    _evaluation(tmp_path / "a" / "eval", A_DICE, "Method A", gt=data)
    _evaluation(tmp_path / "b" / "eval", B_DICE, "Method B", gt=data)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    assert "| Method B vs Method A | all classes | 3 |" in printed
    assert "smallest organs (Ga) | 3 |" in printed and "large organs (Li, Sp) | 3 |" in printed  # 3 classes: 1 small
    with (tmp_path / "cmp" / "comparison.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert [line["group"] for line in lines] == ["all", "large", "small"]
    assert lines[2]["classes"] == "Ga" and float(lines[2]["diff"]) == pytest.approx(20.0)
    assert "not significant" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_cli_pairs_lists_of_evaluations_one_per_seed(tmp_path, capsys):
    a = [_evaluation(tmp_path / f"a{s}", A_DICE, "A") for s in (0, 1)]
    b = [_evaluation(tmp_path / f"b{s}", B_DICE, "B") for s in (0, 1)]
    assert main(["compare", *map(str, a), "--vs", *map(str, b)]) == 0
    captured = capsys.readouterr()
    assert "| B vs A | all classes | 6 |" in captured.out
    # "gt" is no prepared data set: the classes are ranked by the evaluated cases' ground-truth voxels
    assert "ranked by the ground-truth voxels" in captured.err and "smallest organs (Li) | 6 |" in captured.out
    assert main(["compare", str(a[0]), "--vs", *map(str, b)]) == 2
    assert "A has 1 evaluation(s)" in capsys.readouterr().err


def test_cli_on_an_ablation_folder_compares_every_row_with_labeled_only(tmp_path, capsys):
    data = _prepared(tmp_path / "data")
    out = tmp_path / "abl"
    for seed in (0, 1):
        _evaluation(out / "labeled_only" / f"seed{seed}" / "eval-unlabeled", A_DICE, "Labeled only", gt=data)
        _evaluation(out / "full" / f"seed{seed}" / "eval-unlabeled", B_DICE, "SKCDF", gt=data)
        _evaluation(out / "full" / f"seed{seed}" / "eval-labeled", A_DICE, "SKCDF, labeled decoder", gt=data)
    assert list(ablation_methods(out)) == ["full@labeled-decoder", "full", "labeled_only"]
    assert main(["compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| SKCDF vs Labeled only | all classes | 6 |" in printed
    assert "| SKCDF, labeled decoder vs Labeled only | all classes | 6 | " in printed
    assert (out / "comparison.csv").is_file()
    # the same files as `skcdf ablate` writes
    assert write_ablation_comparison(out, ablation_methods(out)) == out / "comparison.md"


def test_an_ablation_with_controls_also_compares_each_method_with_its_own_control(tmp_path):
    data = _prepared(tmp_path / "data")
    out = tmp_path / "abl"
    _ablation_evaluations(out, data, [
        ("labeled_only/eval-unlabeled", A_DICE, "Labeled only"), ("cps/eval-unlabeled", B_DICE, "CPS"),
        ("cps_method_weight-0/eval-unlabeled", B_DICE, "CPS, no unlabeled term"),
        ("depl/eval-unlabeled", A_DICE, "DePL"),  # no control
        ("full/eval-unlabeled", B_DICE, "SKCDF"), ("full_lambda_u-0/eval-unlabeled", A_DICE, "SKCDF, no unlabeled term")])
    markdown = write_ablation_comparison(out, ablation_methods(out), data)
    with (out / "comparison.csv").open() as handle:
        lines = [line for line in csv.DictReader(handle) if line["group"] == "all"]
    assert [(line["method_b"], line["method_a"]) for line in lines] == [
        ("CPS", "Labeled only"), ("CPS, no unlabeled term", "Labeled only"), ("DePL", "Labeled only"),
        ("SKCDF", "Labeled only"), ("SKCDF, no unlabeled term", "Labeled only"),
        ("CPS", "CPS, no unlabeled term"), ("SKCDF", "SKCDF, no unlabeled term")]
    assert float(lines[0]["diff"]) > 0 and float(lines[5]["diff"]) == 0  # the control scored as CPS here
    assert float(lines[6]["diff"]) == float(lines[0]["diff"])  # SKCDF's control scored as labeled-only
    assert "against Labeled only, and each method against its own control" in markdown.read_text()


def test_each_side_of_method_against_control_takes_the_rule_its_validation_split_chose(tmp_path):
    data = _prepared(tmp_path / "data")
    out = tmp_path / "abl"
    _ablation_evaluations(out, data, [
        ("full/eval-unlabeled", A_DICE, "SKCDF"), ("full/eval-labeled", B_DICE, "SKCDF, labeled decoder"),
        ("full_lambda_u-0/eval-unlabeled", B_DICE, "SKCDF, no unlabeled term"),
        ("full_lambda_u-0/eval-mean-tta", A_DICE, "SKCDF, no unlabeled term, decoder mean + flip TTA")])
    with (out / "test_time_rules.csv").open("w", newline="") as handle:  # as write_rule_choice writes it
        writer = csv.writer(handle)
        writer.writerow(["run", "rule", "val_dice", "test_dice", "test_dice_sd", "chosen"])
        writer.writerows([["full", "unlabeled", 40, 0, 0, 0], ["full", "labeled", 50, 0, 0, 1],
                          ["full_lambda_u-0", "unlabeled", 40, 0, 0, 0], ["full_lambda_u-0", "mean-tta", 45, 0, 0, 1]])

    def control_line() -> dict[str, str]:
        write_ablation_comparison(out, ablation_methods(out), data)
        with (out / "comparison.csv").open() as handle:
            lines = [line for line in csv.DictReader(handle) if line["group"] == "all"]
        return lines[-1]

    line = control_line()
    assert (line["method_a"], line["method_b"]) == ("SKCDF, no unlabeled term, decoder mean + flip TTA",
                                                   "SKCDF, labeled decoder")
    b_minus_a = statistics.fmean(statistics.fmean(B_DICE[c]) - statistics.fmean(A_DICE[c]) for c in A_DICE)
    assert float(line["diff"]) == pytest.approx(b_minus_a, abs=1e-3)
    assert "the one its validation split chose" in (out / "comparison.md").read_text()
    (out / "test_time_rules.csv").unlink()  # without a choice, both sides are D_u: the sign flips
    line = control_line()
    assert (line["method_a"], line["method_b"]) == ("SKCDF, no unlabeled term", "SKCDF")
    assert float(line["diff"]) == pytest.approx(-b_minus_a, abs=1e-3)
