"""Aggregate evaluation summaries over seeds (mean ± std, like the paper) and render Markdown tables.

An evaluation summary is the ``summary.json`` written by :func:`skcdf.metrics.evaluate_folders`:
per-class means over cases (``per_class[metric]``, a list aligned with ``classes``) and their
average over classes (``average[metric]``). Aggregating several summaries (one per seed) takes, for
every number, the mean over seeds and the standard deviation across seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from skcdf.utils import InputError

SUMMARY_FORMAT = "skcdf-evaluation"


def find_summaries(run: str | Path) -> list[Path]:
    """The evaluation summaries of a run folder: ``RUN/summary.json``, else ``RUN/eval/summary.json``,
    else every ``RUN/**/summary.json`` (sorted); files named so that are not evaluation summaries
    are passed over. ``run`` may also be a summary file. Raises InputError if there is none."""
    run = Path(run)
    if run.is_file():
        return [run]
    if not run.is_dir():
        raise InputError(f"{run}: no such run folder")
    candidates = [run / "summary.json", run / "eval" / "summary.json"] + sorted(run.glob("**/summary.json"))
    found = list(dict.fromkeys(path for path in candidates if path.is_file() and _is_summary(path)))
    if not found:
        raise InputError(f"{run}: no evaluation summary.json in it (run `skcdf evaluate PRED GT --out {run}/eval` first)")
    return found[:1] if found[0].parent in (run, run / "eval") else found


def _is_summary(path: Path) -> bool:
    try:
        load_summary(path)
    except InputError:
        return False
    return True


def load_summary(path: str | Path) -> dict:
    """Read an evaluation ``summary.json``; InputError naming the file if it is not one."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read evaluation summary ({exc})") from exc
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
        raise InputError(f"{path}: not an skcdf evaluation summary (no \"format\": \"{SUMMARY_FORMAT}\")")
    summary["source"] = str(path)
    return summary


def _mean_std(values: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over axis 0 (seeds); std is NaN when there are not more than ``ddof`` seeds."""
    std = values.std(axis=0, ddof=ddof) if len(values) > ddof else np.full(values.shape[1:], math.nan)
    return values.mean(axis=0), std


def aggregate(summaries: Sequence[Mapping], ddof: int = 0) -> dict:
    """Mean ± std over seeds of each per-class mean and of each class average.

    summaries: evaluation summaries (dicts as in summary.json), one per seed, all with the same classes.
    ddof: 0 for the population std (numpy's default, used in the docs' tables), 1 for the sample std.
    Returns {"runs": n, "ddof", "classes", "class_names", "class_abbrevs", "metrics",
    "per_class": {metric: {"mean": [per class], "std": [...]}}, "average": {metric: {"mean", "std"}}}.
    Missing values (null in JSON) count as NaN.
    """
    if not summaries:
        raise InputError("no evaluation summaries to aggregate")
    first = summaries[0]
    for summary in summaries[1:]:
        if list(summary["classes"]) != list(first["classes"]):
            raise InputError(
                f"{summary.get('source', 'a summary')} has classes {summary['classes']}, "
                f"but {first.get('source', 'the first one')} has {first['classes']}: they cannot be aggregated"
            )
    metrics = [m for m in first["average"] if all(m in s["average"] and m in s["per_class"] for s in summaries)]
    per_class, average = {}, {}
    for metric in metrics:
        class_mean, class_std = _mean_std(np.array([s["per_class"][metric] for s in summaries], dtype=float), ddof)
        avg_mean, avg_std = _mean_std(np.array([s["average"][metric] for s in summaries], dtype=float), ddof)
        per_class[metric] = {"mean": class_mean.tolist(), "std": class_std.tolist()}
        average[metric] = {"mean": float(avg_mean), "std": float(avg_std)}
    return {
        "runs": len(summaries),
        "ddof": ddof,
        "classes": list(first["classes"]),
        "class_names": first.get("class_names"),
        "class_abbrevs": first.get("class_abbrevs"),
        "metrics": metrics,
        "per_class": per_class,
        "average": average,
    }


def _cell(mean: float, std: float | None, decimals: int) -> str:
    if math.isnan(mean):
        return "–"
    if std is None or math.isnan(std):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def render_table(
    rows: Sequence[tuple[str, Mapping]],
    *,
    per_class: bool = True,
    averages: Sequence[tuple[str, str]] = (("dice", "Dice (%)"), ("asd", "ASD (voxel)")),
    decimals: int = 2,
) -> str:
    """A Markdown table in the layout of the paper's Table 1.

    rows: (method name, aggregate from :func:`aggregate`). Columns: the method, then (if per_class)
    the mean Dice of each class headed by its abbreviation (the label number where unknown), then
    each (metric, header) of ``averages`` as mean ± std over seeds (just the mean for one seed).
    """
    if not rows:
        raise InputError("no rows to put in a table")
    classes = rows[0][1]["classes"]
    for name, agg in rows:
        if per_class and agg["classes"] != classes:
            raise InputError(f"row {name!r} has classes {agg['classes']}, the first row {classes}: not one table")
    abbrevs = rows[0][1].get("class_abbrevs") or [str(c) for c in classes]
    header = ["Method"] + (list(abbrevs) if per_class else []) + [title for _, title in averages]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for name, agg in rows:
        cells = [name]
        if per_class:
            cells += [_cell(m, None, decimals) for m in agg["per_class"]["dice"]["mean"]]
        for metric, _ in averages:
            value = agg["average"].get(metric, {"mean": math.nan, "std": math.nan})
            cells.append(_cell(value["mean"], value["std"] if agg["runs"] > 1 else None, decimals))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
