"""Figures: organ overlays on axial CT slices (like the paper's Figure 4) and training curves.

Matplotlib is used through its object API with the Agg canvas, so nothing here touches pyplot's
global state or needs a display.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from skcdf.utils import InputError, atomic_path

# One fixed colour per class label (label 1 gets the first colour, ...), the same in every figure.
ORGAN_COLOURS = (
    "#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
    "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3",
    "#808000", "#ffd8b1", "#000075", "#808080",
)


def organ_colour(label: int) -> str:
    """The fixed colour of class ``label`` (≥ 1); the palette repeats after 20 classes."""
    return ORGAN_COLOURS[(label - 1) % len(ORGAN_COLOURS)]


def pick_slices(label: np.ndarray, count: int) -> list[int]:
    """Axial slice indices (ascending) where ``label`` (D, H, W) shows the most organs.

    Slices are ranked by the number of classes present, then by foreground area; picks are kept at
    least D / (2·count) slices apart so that they do not all show the same anatomy.
    """
    depth = label.shape[0]
    flat = label.reshape(depth, -1)
    organs = np.array([len(np.unique(s[s > 0])) for s in flat])
    area = np.count_nonzero(flat, axis=1)
    min_gap = max(1, depth // (2 * count))
    chosen: list[int] = []
    for index in np.lexsort((-area, -organs)):  # most organs first, then largest area
        if all(abs(int(index) - c) >= min_gap for c in chosen):
            chosen.append(int(index))
        if len(chosen) == count:
            break
    return sorted(chosen)


def _overlay_rgba(labels: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W) labels → (H, W, 4) RGBA float image: organ colours where label > 0, transparent elsewhere."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros(labels.shape + (4,))
    for label in np.unique(labels[labels > 0]):
        rgba[labels == label] = to_rgba(organ_colour(int(label)), alpha)
    return rgba


def overlay_png(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray | None,
    out_png: str | os.PathLike,
    *,
    slices: int = 3,
    class_abbrevs: Sequence[str] | None = None,
    window: tuple[float, float] | None = None,
    alpha: float = 0.5,
) -> list[int]:
    """Write a PNG of axial slices: the scan, the ground truth over it, and the prediction over it.

    image: (D, H, W) intensities; label, pred: (D, H, W) integer label maps (pred may be None).
    slices: how many slices (rows), picked by :func:`pick_slices`. class_abbrevs: legend names by
    label value (index 0 background); labels are shown as numbers where unknown. window: display
    range of the intensities (default: their 1st..99th percentile). Returns the slice indices shown.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if image.shape != label.shape or (pred is not None and pred.shape != label.shape):
        shapes = f"image {image.shape}, label {label.shape}" + ("" if pred is None else f", prediction {pred.shape}")
        raise InputError(f"{out_png}: volumes to overlay have different shapes ({shapes})")
    indices = pick_slices(label, max(1, min(slices, label.shape[0])))
    low, high = window if window is not None else np.percentile(image, [1, 99])
    panels = [("Image", None), ("Ground truth", label)] + ([] if pred is None else [("Prediction", pred)])

    figure = Figure(figsize=(3 * len(panels), 3 * len(indices) + 0.6), layout="constrained")
    axes = figure.subplots(len(indices), len(panels), squeeze=False)
    for row, z in enumerate(indices):
        for column, (title, labels) in enumerate(panels):
            ax = axes[row, column]
            ax.imshow(image[z], cmap="gray", vmin=low, vmax=high, interpolation="nearest")
            if labels is not None:
                ax.imshow(_overlay_rgba(labels[z], alpha), interpolation="nearest")
            ax.set_title(f"{title}, slice {z}", fontsize=9)
            ax.set_axis_off()

    shown = sorted({int(v) for labels in (label, pred) if labels is not None for v in np.unique(labels[indices]) if v > 0})
    names = [class_abbrevs[v] if class_abbrevs is not None and v < len(class_abbrevs) else str(v) for v in shown]
    handles = [Patch(color=organ_colour(v), label=name) for v, name in zip(shown, names)]
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return indices


def _read_columns(path: Path) -> dict[str, list[str]]:
    """The CSV file's columns, header name → list of cell strings."""
    if not path.is_file():
        raise InputError(f"{path}: training metrics file not found")
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise InputError(f"{path}: has no rows")
    return {name: [row.get(name) or "" for row in rows] for name in rows[0]}


def _series(x: list[str], y: list[str]) -> tuple[list[float], list[float]]:
    """The (x, y) points where both cells hold finite numbers (logs mix per-iteration and per-epoch rows)."""
    points = []
    for xs, ys in zip(x, y):
        try:
            point = float(xs), float(ys)
        except ValueError:
            continue
        if all(math.isfinite(v) for v in point):
            points.append(point)
    return [p[0] for p in points], [p[1] for p in points]


#: Columns of the "heads and pseudo-labels" panels (see skcdf.train.monitor).
_HEAD_COLUMNS = ("val_dice_labeled_main", "val_dice_labeled_aux", "val_dice_unlabeled_main", "val_dice_unlabeled_aux")
_SMALL_HEAD_COLUMNS = tuple(name.replace("val_dice_", "val_dice_small_") for name in _HEAD_COLUMNS)
_PSEUDO_DICE_COLUMNS = ("pseudo_dice_main", "pseudo_dice_aux")
_FOREGROUND_COLUMNS = ("pseudo_fg_main", "pseudo_fg_aux", "true_fg")


def _absent_from_validation(values: list[float]) -> bool:
    """A class absent from every validation crop scores exactly 100 at every validation (SPEC §4:
    both sides empty); drawn, it would be a flat line that reads like a perfect organ."""
    return bool(values) and all(v == 100.0 for v in values)


def plot_curves(metrics_csv: str | os.PathLike, out_png: str | os.PathLike) -> list[str]:
    """Plot a run's ``metrics.csv``; returns the columns plotted.

    Panels, each drawn when its columns are there:
    - training losses (``loss*`` against ``iteration``, else ``epoch``);
    - validation Dice: the mean (thick) and each class in its fixed organ colour (the overlay's);
      classes absent from the validation crops are named in the panel instead of drawn;
    - the Dice of every head (D_l/D_u, main/aux) and of the pseudo-labels (dashed), the place where a
      run's collapse shows first;
    - the Dice of every head on the 6 smallest classes: whether the balanced (aux) heads learn them;
    - the foreground fraction of the pseudo-labels beside the true one.
    A panel whose columns hold no values is left out.
    Raises InputError if the file is missing or has none of these columns.
    """
    from matplotlib.figure import Figure

    path = Path(metrics_csv)
    columns = _read_columns(path)
    class_columns = [n for n in columns if n.startswith("val_dice_") and n != "val_dice_mean"
                     and n not in _HEAD_COLUMNS + _SMALL_HEAD_COLUMNS]
    panels = [("Training loss", ("iteration", "epoch"), [n for n in columns if n.startswith("loss")]),
              ("Validation Dice (inference head)", ("epoch", "iteration"),
               [n for n in ("val_dice_mean", *class_columns) if n in columns]),
              ("Dice of each head and of the pseudo-labels", ("epoch", "iteration"),
               [n for n in (*_HEAD_COLUMNS, *_PSEUDO_DICE_COLUMNS) if n in columns]),
              ("Dice of each head, 6 smallest classes", ("epoch", "iteration"),
               [n for n in _SMALL_HEAD_COLUMNS if n in columns]),
              ("Foreground fraction", ("epoch", "iteration"), [n for n in _FOREGROUND_COLUMNS if n in columns])]
    panels = [(title, next(x for x in xs if x in columns), names) for title, xs, names in panels
              if names and any(x in columns for x in xs)]
    # a column with no values (a Table 1 method has no pseudo-label monitor) draws no panel
    panels = [(title, x_name, names) for title, x_name, names in panels
              if any(_series(columns[x_name], columns[name])[0] for name in names)]
    if not panels:
        raise InputError(f"{path}: no 'loss*' or 'val_dice*' columns with an 'iteration' or 'epoch' column to plot")

    figure = Figure(figsize=(6 * len(panels), 4.5), layout="constrained")
    plotted = []
    for ax, (title, x_name, names) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        absent = []
        for name in names:
            x, y = _series(columns[x_name], columns[name])
            if not x:
                continue
            style: dict = {"linewidth": 1}
            if name in class_columns:
                if _absent_from_validation(y):
                    absent.append(name.removeprefix("val_dice_"))
                    continue
                style["color"] = organ_colour(class_columns.index(name) + 1)
            elif name == "val_dice_mean":
                style.update(color="black", linewidth=2.5)
            elif name.startswith("pseudo_"):
                style["linestyle"] = "--"
            ax.plot(x, y, label=name.removeprefix("val_dice_").removeprefix("small_"), **style)
            plotted.append(name)
        if absent:
            ax.text(0.01, 0.99, "absent from the validation crops\n(Dice 100 by convention): " + ", ".join(absent),
                    transform=ax.transAxes, va="top", fontsize=7, color="dimgray")
        ax.set_title(title)
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 8 else 1)
    if not plotted:
        raise InputError(f"{path}: the loss / val_dice columns hold no numbers")
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return plotted


def plot_runs(metrics_csvs: Mapping[str, str | os.PathLike], out_png: str | os.PathLike) -> dict[str, list[str]]:
    """Several runs side by side, one line each (named by the keys of ``metrics_csvs``):

    - the inference head's validation Dice against the iteration;
    - the same against λ, the weight of the unlabeled loss at that epoch (metrics.csv's ``lambda``):
      where the unlabeled loss starts to help or to hurt. Runs whose λ never moves are left out there;
    - the validation Dice of D_l's main head and of D_u's (dashed) against the iteration, where the runs
      have them.
    Returns the runs drawn in each panel: ``{"iteration": [...], "lambda": [...], "decoders": [...]}``.
    Raises InputError for a missing file, or when no run has validation Dice.
    """
    from matplotlib.figure import Figure

    runs = {name: _read_columns(Path(path)) for name, path in metrics_csvs.items()}
    if not any(_series(columns.get("iteration", []), columns.get("val_dice_mean", []))[0]
               for columns in runs.values()):
        raise InputError("none of the runs has validation Dice (val_dice_mean) to plot")
    figure = Figure(figsize=(18, 4.5), layout="constrained")
    by_iteration, by_lambda, by_decoder = figure.subplots(1, 3)
    drawn: dict[str, list[str]] = {"iteration": [], "lambda": [], "decoders": []}
    for index, (name, columns) in enumerate(runs.items()):
        colour = f"C{index % 10}"
        x, y = _series(columns.get("iteration", []), columns.get("val_dice_mean", []))
        if x:
            by_iteration.plot(x, y, color=colour, label=name)
            drawn["iteration"].append(name)
        x, y = _series(columns.get("lambda", []), columns.get("val_dice_mean", []))
        if len(set(x)) > 1:
            by_lambda.plot(x, y, color=colour, label=name)
            drawn["lambda"].append(name)
        for head, style in (("labeled", "-"), ("unlabeled", "--")):
            x, y = _series(columns.get("iteration", []), columns.get(f"val_dice_{head}_main", []))
            if x:
                by_decoder.plot(x, y, color=colour, linestyle=style, label=f"{name}, D_{head[0]}")
                drawn["decoders"] += [] if name in drawn["decoders"] else [name]
    for ax, title, x_label in ((by_iteration, "Validation Dice (inference head)", "iteration"),
                               (by_lambda, "Validation Dice against the unlabeled loss's weight", "λ"),
                               (by_decoder, "Validation Dice of D_l (solid) and D_u (dashed)", "iteration")):
        ax.set_title(title)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return drawn
