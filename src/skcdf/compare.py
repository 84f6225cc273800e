"""Paired comparison of two methods over the same (seed, case) pairs: is B better than A?

For every pair (a test case of one seed, evaluated for both methods) the difference B − A of the
case's class-averaged Dice is taken over three groups of classes: all classes, the large organs and
the smallest ones (:func:`class_groups`). Each group reports n, the mean difference, a seeded
percentile-bootstrap 95 % interval of that mean, the two-sided Wilcoxon signed-rank p-value, and the
mean difference of each seed: a gain that shows up reliably is ahead on every seed.
Conventions in docs/metrics.md ("Paired comparison").
"""

from __future__ import annotations

import csv
import inspect
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from skcdf.data.layout import has_label, read_dataset_info, read_split, split_names
from skcdf.data.stats import class_voxel_counts
from skcdf.report import load_summary
from skcdf.utils import InputError, atomic_write_text

#: Size of the "smallest classes" group with 12 or more foreground classes (the paper's small organs).
SMALLEST = 6
#: Group keys, in table order, and their titles.
GROUP_TITLES = {"all": "all classes", "large": "large organs", "small": "smallest organs"}
#: Bootstrap settings: resamples, confidence level and the seed that makes the interval reproducible.
RESAMPLES = 10_000
CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0
#: Significance level of the one-sentence readings.
ALPHA = 0.05

CSV_COLUMNS = ("method_a", "method_b", "group", "classes", "n", "dice_a", "dice_b", "diff", "ci_low", "ci_high",
               "wilcoxon_p", "seeds", "seeds_ahead", "seed_diffs")


@dataclass(frozen=True)
class Method:
    """A method's evaluation folders (each holding per_case.csv), keyed by seed (or any pairing key)."""

    name: str
    evaluations: Mapping[str, Path]


@dataclass(frozen=True)
class PairedStats:
    """Statistics of paired differences B − A (Dice points)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    ci_low: float
    ci_high: float
    p_value: float


@dataclass(frozen=True)
class ComparisonRow:
    """One line of the comparison table: B against A over one group of classes."""

    method_a: str
    method_b: str
    group: str
    classes: tuple[str, ...]
    stats: PairedStats
    #: Mean B − A over each seed's cases, in the order of A's seeds.
    seed_differences: tuple[float, ...]

    @property
    def seeds_ahead(self) -> int:
        """Seeds on which B's mean is above A's."""
        return sum(difference > 0 for difference in self.seed_differences)


# ----------------------------------------------------------------------------- statistics

def bootstrap_interval(differences: np.ndarray, *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``differences`` (n,), seeded (``scipy.stats.bootstrap``).

    Fewer than two values: (nan, nan). All values equal: that value twice (every resample agrees).
    """
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size < 2:
        return math.nan, math.nan
    if np.ptp(differences) == 0:
        return float(differences[0]), float(differences[0])
    # SciPy 1.15 renamed random_state to rng; both take a Generator.
    rng_keyword = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"
    result = stats.bootstrap((differences,), np.mean, n_resamples=resamples, confidence_level=confidence,
                             method="percentile", vectorized=True, **{rng_keyword: np.random.default_rng(seed)})
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``differences`` (scipy's defaults: zero differences
    are dropped, exact distribution for small samples). All differences zero: 1.0 (no evidence of a
    difference; scipy itself has no statistic then). No differences: nan."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0:
        return math.nan
    if not np.any(differences):
        return 1.0
    return float(stats.wilcoxon(differences, alternative="two-sided").pvalue)


def paired_stats(a: np.ndarray, b: np.ndarray, **bootstrap: float) -> PairedStats:
    """Statistics of B − A for paired values ``a``, ``b`` (n,); ``bootstrap`` goes to :func:`bootstrap_interval`."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need equal 1-D shapes, got {a.shape} and {b.shape}")
    differences = b - a
    mean = (lambda v: float(v.mean()) if v.size else math.nan)
    low, high = bootstrap_interval(differences, **bootstrap)
    return PairedStats(a.size, mean(a), mean(b), mean(differences), low, high, wilcoxon_p(differences))


# ----------------------------------------------------------------------------- groups of classes

def class_groups(counts: Sequence[int] | Mapping[int, int], classes: Sequence[int]) -> dict[str, list[int]]:
    """Classes of each group: "all" = ``classes``; "small" = the :data:`SMALLEST` of them with the fewest
    voxels in ``counts`` (indexed by label; ties: the lower label), or the smaller half when there are
    fewer than 2 × SMALLEST; "large" = the others. Each list is in label order."""
    classes = sorted(classes)
    size = SMALLEST if len(classes) >= 2 * SMALLEST else len(classes) // 2
    small = sorted(sorted(classes, key=lambda label: (counts[label], label))[:size])
    return {"all": classes, "large": [label for label in classes if label not in small], "small": small}


def training_class_counts(root: str | os.PathLike, split: str = "train") -> np.ndarray:
    """Voxels of each class (K,) in the label maps of ``split``'s labeled cases of a prepared data set."""
    cases = [case for case in read_split(root, split) if has_label(root, case)]
    if not cases:
        raise InputError(f"{root}: no case of split '{split}' has a label map to count the classes' voxels")
    return class_voxel_counts(root, cases, int(read_dataset_info(root)["num_classes"]))


# ----------------------------------------------------------------------------- per-case Dice and pairing

def read_case_dice(evaluation: str | os.PathLike) -> tuple[list[int], dict[str, np.ndarray]]:
    """Classes and, per case, the Dice of each class (aligned with the classes) from ``per_case.csv``."""
    path = Path(evaluation) / "per_case.csv"
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        table = {(row["case"], int(row["class"])): float(row["dice"]) for row in rows}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a readable per_case.csv of `skcdf evaluate` ({exc})") from None
    classes = sorted({label for _, label in table})
    cases = list(dict.fromkeys(case for case, _ in table))
    missing = [f"{case}/{label}" for case in cases for label in classes if (case, label) not in table]
    if missing or not cases:
        raise InputError(f"{path}: no rows, or rows missing for case/class {', '.join(missing[:5])}")
    return classes, {case: np.array([table[case, label] for label in classes]) for case in cases}


def paired_case_dice(a: Method, b: Method) -> tuple[list[int], list[str], np.ndarray, np.ndarray]:
    """Classes, the seed of each pair (n,) and the per-class Dice (n, C) of A and B over the same
    (seed, case) pairs.

    Pairs cover every case of every seed both methods have. Raises InputError naming the folders
    when they share no seed, or when two paired evaluations differ in cases or classes.
    """
    seeds = [seed for seed in a.evaluations if seed in b.evaluations]
    if not seeds:
        raise InputError(f"{a.name} ({', '.join(a.evaluations)}) and {b.name} ({', '.join(b.evaluations)}) "
                         "share no seed to pair")
    classes, pair_seeds, rows_a, rows_b = None, [], [], []
    for seed in seeds:
        folder_a, folder_b = a.evaluations[seed], b.evaluations[seed]
        (classes_a, dice_a), (classes_b, dice_b) = read_case_dice(folder_a), read_case_dice(folder_b)
        if classes_a != classes_b or (classes is not None and classes_a != classes):
            raise InputError(f"{folder_a} and {folder_b}: evaluated classes differ ({classes_a} and {classes_b})")
        if set(dice_a) != set(dice_b):
            only_a, only_b = sorted(set(dice_a) - set(dice_b)), sorted(set(dice_b) - set(dice_a))
            raise InputError(f"{folder_a} and {folder_b} do not hold the same cases: only in the first "
                             f"{only_a or 'none'}, only in the second {only_b or 'none'}")
        classes = classes_a
        pair_seeds += [seed] * len(dice_a)
        rows_a += [dice_a[case] for case in sorted(dice_a)]
        rows_b += [dice_b[case] for case in sorted(dice_a)]
    return classes, pair_seeds, np.stack(rows_a), np.stack(rows_b)


def compare(a: Method, b: Method, groups: Mapping[str, Sequence[int]],
            abbrevs: Mapping[int, str] | None = None) -> list[ComparisonRow]:
    """B against A for each non-empty group (class labels): per-case class-averaged Dice, paired.

    abbrevs: label → name for the table (default: the label numbers).
    """
    classes, pair_seeds, dice_a, dice_b = paired_case_dice(a, b)
    pair_seeds = np.array(pair_seeds)
    rows = []
    for group, members in groups.items():
        unknown = sorted(set(members) - set(classes))
        if unknown:
            raise InputError(f"{a.name} / {b.name}: classes {unknown} of group '{group}' were not evaluated")
        columns = [classes.index(label) for label in members]
        if columns:
            names = tuple((abbrevs or {}).get(label, str(label)) for label in members)
            group_a, group_b = dice_a[:, columns].mean(axis=1), dice_b[:, columns].mean(axis=1)
            differences = group_b - group_a
            per_seed = tuple(float(differences[pair_seeds == seed].mean()) for seed in dict.fromkeys(pair_seeds))
            rows.append(ComparisonRow(a.name, b.name, group, names, paired_stats(group_a, group_b), per_seed))
    return rows


# ----------------------------------------------------------------------------- output

def _number(value: float, sign: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}" if sign else f"{value:.2f}"


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def render_markdown(rows: Sequence[ComparisonRow]) -> str:
    """The comparison as a Markdown table (Dice in %, differences in points)."""
    lines = ["| B vs A | classes | n | Dice A | Dice B | B − A | 95 % CI | Wilcoxon p | seeds ahead |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in rows:
        s = row.stats
        title = f"{GROUP_TITLES.get(row.group, row.group)} ({', '.join(row.classes)})" if row.group != "all" \
            else GROUP_TITLES["all"]
        lines.append(f"| {row.method_b} vs {row.method_a} | {title} | {s.n} | {_number(s.mean_a)} | "
                     f"{_number(s.mean_b)} | {_number(s.mean_diff, True)} | "
                     f"{_number(s.ci_low, True)} to {_number(s.ci_high, True)} | {_p(s.p_value)} | "
                     f"{row.seeds_ahead}/{len(row.seed_differences)} |")
    return "\n".join(lines) + "\n"


def render_csv(rows: Sequence[ComparisonRow]) -> str:
    """The comparison as CSV, columns :data:`CSV_COLUMNS` (classes and seed_diffs space-separated, NaN as
    ``nan``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        s = row.stats
        writer.writerow([row.method_a, row.method_b, row.group, " ".join(row.classes), s.n,
                         *(f"{v:.4f}" for v in (s.mean_a, s.mean_b, s.mean_diff, s.ci_low, s.ci_high)),
                         f"{s.p_value:.4g}", len(row.seed_differences), row.seeds_ahead,
                         " ".join(f"{v:.4f}" for v in row.seed_differences)])
    return buffer.getvalue()


def reading(row: ComparisonRow, alpha: float = ALPHA) -> str:
    """One sentence saying what a row shows and whether the difference is significant at ``alpha``."""
    s = row.stats
    significant = not math.isnan(s.p_value) and s.p_value < alpha
    verdict = f"{'' if significant else 'not '}significant at the {alpha * 100:g} % level"
    return (f"Over {s.n} paired test cases, {row.method_b} minus {row.method_a} is {_number(s.mean_diff, True)} "
            f"points of mean Dice ({GROUP_TITLES.get(row.group, row.group)}; 95 % CI {_number(s.ci_low, True)} to "
            f"{_number(s.ci_high, True)}, Wilcoxon p = {_p(s.p_value)}): {verdict}; ahead on "
            f"{row.seeds_ahead} of {len(row.seed_differences)} seed(s).")


# ----------------------------------------------------------------------------- methods from folders

def _summary(method: Method) -> dict:
    return load_summary(next(iter(method.evaluations.values())) / "summary.json")


def _test_voxel_counts(evaluation: Path) -> dict[int, int]:
    """Ground-truth voxels of each class summed over the cases of ``evaluation``'s per_case.csv."""
    counts: dict[int, int] = {}
    with (evaluation / "per_case.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            counts[int(row["class"])] = counts.get(int(row["class"]), 0) + int(row["gt_voxels"])
    return counts


def groups_for(reference: Method, data: str | os.PathLike | None = None) -> dict[str, list[int]]:
    """The class groups of a comparison: from the training labels of ``data``, else of the prepared
    data set the reference was evaluated against (summary.json's ``gt``); when neither is a prepared
    data set with a train split, from the ground-truth voxels of the evaluated cases (a warning says so)."""
    summary = _summary(reference)
    root = Path(data) if data is not None else Path(summary["gt"])
    if data is not None or ((root / "dataset.json").is_file() and "train" in split_names(root)):
        return class_groups(training_class_counts(root), summary["classes"])
    first = next(iter(reference.evaluations.values()))
    warnings.warn(f"{root} is not a prepared data set with a train split: the smallest organs are ranked by "
                  f"the ground-truth voxels of the cases in {first}/per_case.csv (pass --data for the training labels)")
    return class_groups(_test_voxel_counts(first), summary["classes"])


def compare_to_reference(reference: Method, others: Sequence[Method],
                         data: str | os.PathLike | None = None) -> list[ComparisonRow]:
    """Every method of ``others`` (B) against ``reference`` (A), group by group (see :func:`groups_for`)."""
    summary = _summary(reference)
    abbrevs = dict(zip(summary["classes"], summary["class_abbrevs"] or []))
    groups = groups_for(reference, data)
    return [row for other in others for row in compare(reference, other, groups, abbrevs)]


def write_comparison(out: str | os.PathLike, rows: Sequence[ComparisonRow], heading: str) -> Path:
    """Write ``OUT/comparison.md`` (``heading``, the table, one reading per method) and ``OUT/comparison.csv``."""
    out = Path(out)
    readings = [f"- {reading(row)}" for row in rows if row.group == "all"]
    text = (f"{heading}\n\nPaired over the same (seed, test case) pairs: per case, the Dice averaged over the "
            f"group's classes; B − A in Dice points, its bootstrap {CONFIDENCE * 100:g} % interval and the two-sided "
            "Wilcoxon signed-rank p (docs/metrics.md).\n\n" + render_markdown(rows) + "\n" + "\n".join(readings) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.csv", render_csv(rows))
    return out / "comparison.md"
