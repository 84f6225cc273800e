"""Evaluating folders of label maps: match predictions with their ground truth, compute the metrics
of :mod:`skcdf.metrics` case by case (in parallel), and write per_case.csv, summary.json and table.md.

The ground truth is a folder of label maps matched by case id, or a prepared data set (its labels,
and the spacing of the prepared grid from each case's geometry json).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from skcdf.data.geometry import prepared_grid
from skcdf.data.layout import (has_label, is_prepared_dataset, load_geometry, load_label, read_dataset_info,
                               read_id_list, read_npy, read_split)
from skcdf.data.preprocess import read_label
from skcdf.data.sources import IMAGE_SUFFIXES
from skcdf.metrics import EMPTY_PENALTY, METRICS, evaluate_case
from skcdf.parallel import available_cores, map_cases
from skcdf.report import SUMMARY_FORMAT, aggregate, render_table
from skcdf.utils import InputError, atomic_path, atomic_write_text

# File endings of label maps in a prediction or ground-truth folder.
LABEL_SUFFIXES = IMAGE_SUFFIXES + (".npy",)

# Without dataset.json or --classes, labels are read as uint8 (0..255) and the classes are 1..max seen.
MAX_LABELS = 256

CSV_COLUMNS = ("case", "class") + METRICS + ("pred_voxels", "gt_voxels")


@dataclass(frozen=True)
class _CaseJob:
    """What one worker needs to evaluate one case (picklable)."""

    case: str
    pred: Path
    gt: Path  # a label file, or the prepared data set root when ``prepared``
    prepared: bool
    classes: tuple[int, ...]
    num_labels: int  # label values must lie in 0..num_labels-1
    threads: int


def label_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Case id → label file (SimpleITK formats or .npy) directly in ``folder``; the id is the name
    without its extension. Raises InputError if the folder is missing, has none, or two share an id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in LABEL_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file() or path.name.startswith("."):
            continue
        case = path.name[: -len(suffix)]
        if case in files:
            raise InputError(f"{folder}: both {files[case].name} and {path.name} are case '{case}'")
        files[case] = path
    if not files:
        raise InputError(f"{folder}: no label files ({', '.join(LABEL_SUFFIXES)})")
    return files


def read_label_file(path: Path, num_labels: int = MAX_LABELS) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A label map (D, H, W) with values in 0..num_labels-1, and its (z, y, x) spacing (None for .npy).

    Raises InputError naming the file if it is unreadable, not 3-D or holds other values.
    """
    if not path.name.lower().endswith(".npy"):
        image = read_label(path, num_labels)
        return sitk.GetArrayFromImage(image), tuple(reversed(image.GetSpacing()))
    labels = read_npy(path)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise InputError(f"{path}: label map has non-integer values")
        labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise InputError(f"{path}: label values {labels.min()}..{labels.max()} outside 0..{num_labels - 1}")
    return labels, None


def _load_ground_truth(job: _CaseJob) -> tuple[np.ndarray, tuple[float, ...] | None]:
    if not job.prepared:
        return read_label_file(job.gt, job.num_labels)
    labels = load_label(job.gt, job.case)
    geometry = load_geometry(job.gt, job.case)
    # The prepared volume covers the original scan's extent with fewer voxels: its spacing is coarser.
    spacing = None if geometry is None else tuple(reversed(prepared_grid(geometry, labels.shape).spacing))
    return labels, spacing


def _evaluate_job(job: _CaseJob) -> list[dict]:
    """Rows of one case (module level, so that worker processes can run it)."""
    gt, spacing = _load_ground_truth(job)
    pred, _ = read_label_file(job.pred, job.num_labels)
    if pred.shape != gt.shape:
        raise InputError(f"{job.pred}: prediction shape {pred.shape} differs from the ground truth's {gt.shape}")
    return [{"case": job.case, **row} for row in evaluate_case(pred, gt, job.classes, spacing, threads=job.threads)]


def _split_ids(gt: Path, prepared: bool, split: str) -> list[str]:
    """Case ids of ``split``: a split file path, or a split name of the ground-truth folder."""
    if Path(split).is_file():
        return read_id_list(Path(split))
    if prepared:
        return read_split(gt, split)
    candidates = [gt / "splits" / f"{split}.txt", gt / f"{split}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise InputError(f"{candidates[0]}: split file not found (nor {candidates[1]})")
    return read_id_list(path)


def _matched_cases(pred_files: dict[str, Path], gt: Path, prepared: bool, split: str | None) -> list[tuple[str, Path]]:
    """(case, ground truth) of each case to evaluate: every prediction, or every case of ``split``.

    Raises InputError naming the cases that have no ground truth, or (with a split) no prediction.
    """
    cases = sorted(pred_files) if split is None else list(dict.fromkeys(_split_ids(gt, prepared, split)))
    if prepared:
        gt_of = {case: gt for case in cases if has_label(gt, case)}
    else:
        gt_of = label_files(gt)
    missing = [case for case in cases if case not in gt_of]
    if missing:
        raise InputError(f"{gt}: no ground truth for case(s) {', '.join(missing)}")
    missing = [case for case in cases if case not in pred_files]
    if missing:
        raise InputError(f"{next(iter(pred_files.values())).parent}: no prediction for case(s) {', '.join(missing)} of split '{split}'")
    return [(case, gt_of[case]) for case in cases]


def _mean_over_cases(values: Sequence[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN if none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def summarize(rows: Sequence[dict], classes: Sequence[int]) -> dict:
    """Per-class means over cases and their average over classes, for every metric.

    Returns {"per_class": {metric: [mean per class, in ``classes`` order]}, "average": {metric: mean}}.
    NaN values (mm metrics without spacing or with one side empty) are left out of the means.
    """
    per_class = {
        metric: [_mean_over_cases([row[metric] for row in rows if row["class"] == label]) for label in classes]
        for metric in METRICS
    }
    return {"per_class": per_class, "average": {metric: _mean_over_cases(values) for metric, values in per_class.items()}}


def _json_ready(value):
    """``value`` with NaN floats replaced by None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_per_case_csv(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """Long-form CSV, one row per case and class, columns :data:`CSV_COLUMNS` (NaN written as ``nan``)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def evaluate_folders(
    pred_dir: str | os.PathLike,
    gt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    classes: Sequence[int] | None = None,
    split: str | None = None,
    name: str | None = None,
    dataset: str | os.PathLike | None = None,
    workers: int | None = None,
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against its ground truth; write the results to ``out_dir``.

    pred_dir: label maps ``<case id>.<ext>`` (any SimpleITK format or .npy). gt: a folder of label
    maps matched by case id, or a prepared data set root (``npy/<id>_label.npy``). split: evaluate
    exactly the cases of this split (a name of gt's split files, or a split file) instead of every
    prediction. classes: default 1..K-1 from dataset.json (of gt, or of ``dataset``), else 1..the
    largest label seen. name: the method's name in table.md (default: pred_dir's name). workers:
    processes, one case each (default: one per core).
    Writes ``per_case.csv`` (:data:`CSV_COLUMNS`), ``summary.json`` and ``table.md``; returns the summary.
    Distances use the ground truth's spacing (image header, or the prepared grid derived from the
    case's geometry json); the prediction's header is not consulted.
    """
    pred_dir, gt, out_dir = Path(pred_dir), Path(gt), Path(out_dir)
    if not gt.exists():
        raise InputError(f"{gt}: ground truth not found")
    prepared = gt.is_dir() and is_prepared_dataset(gt)
    info_root = Path(dataset) if dataset is not None else gt if prepared else None
    if info_root is not None and info_root.name == "dataset.json":
        info_root = info_root.parent
    info = read_dataset_info(info_root) if info_root is not None else None
    num_labels = info["num_classes"] if info else MAX_LABELS
    if classes is not None and (not classes or min(classes) < 0 or max(classes) >= num_labels):
        raise InputError(f"classes {list(classes)} outside the label range 0..{num_labels - 1}")
    eval_classes = tuple(classes) if classes is not None else tuple(range(1, num_labels))

    pred_files = label_files(pred_dir)
    cases = _matched_cases(pred_files, gt, prepared, split)
    workers = min(workers or available_cores(), len(cases))
    threads = max(1, available_cores() // workers)
    jobs = [_CaseJob(case, pred_files[case], truth, prepared, eval_classes, num_labels, threads) for case, truth in cases]
    rows = [row for case_rows in map_cases(_evaluate_job, jobs, workers, desc="evaluate") for row in case_rows]

    if classes is None and info is None:  # classes 1..the largest label present in any case
        present = [row["class"] for row in rows if row["pred_voxels"] or row["gt_voxels"]]
        if not present:
            raise InputError(f"{pred_dir}: no foreground label in any prediction or ground truth; pass --classes")
        eval_classes = tuple(range(1, max(present) + 1))
        rows = [row for row in rows if row["class"] in eval_classes]

    summary = {
        "format": SUMMARY_FORMAT,
        "name": name or pred_dir.resolve().name,
        "pred": str(pred_dir),
        "gt": str(gt),
        "split": split,
        "num_cases": len(cases),
        "cases": [case for case, _ in cases],
        "classes": list(eval_classes),
        "class_names": [info["class_names"][c] for c in eval_classes] if info else None,
        "class_abbrevs": [info["class_abbrevs"][c] for c in eval_classes] if info else None,
        "metrics": list(METRICS),
        "empty_penalty": EMPTY_PENALTY,
        **summarize(rows, eval_classes),
    }
    write_per_case_csv(rows, out_dir / "per_case.csv")
    atomic_write_text(out_dir / "summary.json", json.dumps(_json_ready(summary), indent=2) + "\n")
    atomic_write_text(out_dir / "table.md", render_table([(summary["name"], aggregate([summary]))]))
    return summary
