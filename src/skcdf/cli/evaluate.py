"""`skcdf evaluate`, `skcdf report`, `skcdf overlay`, `skcdf curves`: metrics, tables and figures
(see docs/metrics.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from skcdf.utils import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="Dice, ASD, HD95, ASSD per case and class of a folder of predictions",
        description=(
            "Compare each prediction PRED/<id>.<ext> (any SimpleITK format or .npy) with its ground truth: a "
            "folder of label maps matched by id, or a prepared data set (ROOT/npy/<id>_label.npy). Writes "
            "OUT/per_case.csv, OUT/summary.json and OUT/table.md (paper Table 1 layout). ASD is medpy's "
            "one-directional asd(prediction, reference) in voxels; one side empty → Dice 0 and distances 128."
        ),
    )
    evaluate.add_argument("pred", metavar="PRED", help="folder of predicted label maps")
    evaluate.add_argument("gt", metavar="GT", help="folder of reference label maps, or a prepared data set")
    evaluate.add_argument("--classes", type=int, nargs="+", metavar="C",
                          help="labels to evaluate (default: 1..K-1 from dataset.json, else 1..largest label seen)")
    evaluate.add_argument("--out", default=None, metavar="DIR", help="output folder (default: PRED/eval)")
    evaluate.add_argument("--split", default=None, metavar="NAME",
                          help="evaluate exactly this split's cases (a split name of GT, or a split file)")
    evaluate.add_argument("--name", default=None, help="method name in table.md (default: PRED's folder name)")
    evaluate.add_argument("--dataset", default=None, metavar="ROOT",
                          help="prepared data set (or dataset.json) giving class names when GT is a label folder")
    evaluate.add_argument("--workers", type=int, default=None, metavar="N",
                          help="processes, one case each (default: one per CPU core)")
    evaluate.set_defaults(func=_evaluate)

    report = subparsers.add_parser(
        "report",
        help="mean ± std over seeds of evaluation summaries, as a Markdown table",
        description=(
            "Each RUN is a folder with an evaluation summary.json (RUN/summary.json, RUN/eval/summary.json, or "
            "every RUN/**/summary.json), or the file itself. Every summary found is one seed. Without --names, "
            "all of them form one row; with one name per RUN, each RUN is its own row."
        ),
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folder or summary.json")
    report.add_argument("--names", nargs="+", metavar="NAME", help="row name(s): one for all RUNs, or one per RUN")
    report.add_argument("--out", default=None, metavar="FILE", help="also write the table to this Markdown file")
    report.add_argument("--ddof", type=int, choices=(0, 1), default=0,
                        help="std across seeds: 0 population (default), 1 sample")
    report.set_defaults(func=_report)

    overlay = subparsers.add_parser(
        "overlay",
        help="PNG of axial slices with ground truth and prediction in fixed organ colours",
        description="IMAGE, LABEL and PRED are (D, H, W) volumes: files SimpleITK reads, or .npy.",
    )
    overlay.add_argument("image", metavar="IMAGE")
    overlay.add_argument("label", metavar="LABEL", help="ground-truth label map")
    overlay.add_argument("pred", metavar="PRED", nargs="?", help="predicted label map (optional)")
    overlay.add_argument("--out", required=True, metavar="PNG")
    overlay.add_argument("--slices", type=int, default=3, metavar="N", help="slices to show (default: 3)")
    overlay.add_argument("--dataset", default=None, metavar="ROOT",
                         help="prepared data set (or dataset.json) naming the classes in the legend "
                              "(default: a dataset.json beside LABEL or one folder up)")
    overlay.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                         help="intensity display range (default: 1st..99th percentile)")
    overlay.set_defaults(func=_overlay)

    curves = subparsers.add_parser("curves", help="plot loss and validation Dice of a training run, or compare runs",
                                   description="Reads RUN/metrics.csv (or RUN itself when it is a CSV file). With "
                                               "several runs: their validation Dice side by side, against the "
                                               "iteration and against the unlabeled loss's weight λ.")
    curves.add_argument("runs", metavar="RUN", nargs="+")
    curves.add_argument("--out", required=True, metavar="PNG")
    curves.set_defaults(func=_curves)


def _evaluate(args: argparse.Namespace) -> int:
    from skcdf.evaluation import evaluate_folders

    out = Path(args.out) if args.out else Path(args.pred) / "eval"
    summary = evaluate_folders(args.pred, args.gt, out, classes=args.classes, split=args.split, name=args.name,
                               dataset=args.dataset, workers=args.workers)
    print((out / "table.md").read_text(), end="")
    print(f"{summary['num_cases']} case(s), {len(summary['classes'])} class(es): results in {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from skcdf.report import aggregate, find_summaries, load_summary, render_table
    from skcdf.utils import atomic_write_text

    runs = [Path(run) for run in args.runs]
    names = args.names or []
    if len(names) > 1 and len(names) != len(runs):
        raise InputError(f"--names gives {len(names)} names for {len(runs)} runs: give one, or one per run")
    if len(names) > 1:
        groups = [(name, [run]) for name, run in zip(names, runs)]
    else:
        default = runs[0].resolve().name if len(runs) == 1 else os.path.commonprefix([r.resolve().name for r in runs])
        groups = [(names[0] if names else default.rstrip("_-. ") or "runs", runs)]

    rows = []
    for name, group in groups:
        paths = [path for run in group for path in find_summaries(run)]
        print(f"{name}: {len(paths)} seed(s): {', '.join(map(str, paths))}", file=sys.stderr)
        rows.append((name, aggregate([load_summary(path) for path in paths], ddof=args.ddof)))
    std = "population" if args.ddof == 0 else "sample"
    table = render_table(rows) + f"\nPer-class columns: mean Dice (%); averages: mean ± {std} std over seeds.\n"
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, table)
    return 0


def _read_volume(path: str, labels: bool):
    """(D, H, W) array of a SimpleITK-readable file or .npy: integer labels, or float32 intensities."""
    import numpy as np

    from skcdf.data.layout import read_npy
    from skcdf.evaluation import read_label_file

    if labels:
        return read_label_file(Path(path))[0]
    if path.lower().endswith(".npy"):
        return read_npy(Path(path)).astype(np.float32)
    import SimpleITK as sitk

    from skcdf.data.preprocess import read_image

    return sitk.GetArrayFromImage(read_image(path)).astype(np.float32)


def _class_abbrevs(dataset: str | None, label: str) -> list[str] | None:
    """Class abbreviations from --dataset, else from a dataset.json beside LABEL or one folder up."""
    from skcdf.data.layout import read_dataset_info

    if dataset is not None:
        root = Path(dataset)
        return read_dataset_info(root.parent if root.name == "dataset.json" else root)["class_abbrevs"]
    folder = Path(label).resolve().parent
    root = next((f for f in (folder, folder.parent) if (f / "dataset.json").is_file()), None)
    return None if root is None else read_dataset_info(root)["class_abbrevs"]


def _overlay(args: argparse.Namespace) -> int:
    from skcdf.viz import overlay_png

    shown = overlay_png(
        _read_volume(args.image, labels=False),
        _read_volume(args.label, labels=True),
        None if args.pred is None else _read_volume(args.pred, labels=True),
        args.out,
        slices=args.slices,
        class_abbrevs=_class_abbrevs(args.dataset, args.label),
        window=tuple(args.window) if args.window else None,
    )
    print(f"wrote {args.out} (axial slices {', '.join(map(str, shown))})")
    return 0


def _curves(args: argparse.Namespace) -> int:
    from skcdf.viz import plot_curves, plot_runs

    files = {run: Path(run) if run.endswith(".csv") else Path(run) / "metrics.csv" for run in args.runs}
    if len(files) == 1:
        plotted = plot_curves(next(iter(files.values())), args.out)
        print(f"wrote {args.out} ({', '.join(plotted)})")
    else:
        plot_runs(files, args.out)
        print(f"wrote {args.out} ({len(files)} runs)")
    return 0
