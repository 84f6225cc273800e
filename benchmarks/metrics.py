"""Time skcdf.metrics.evaluate_case against medpy on a CT-sized pair of label maps.

The pair: 200×512×512 (D, H, W) uint8 label maps with 13 ellipsoid / tube "organs" at abdominal-CT
sizes (liver about 90×200×180 voxels, adrenal glands about 20×20×14); the prediction moves and
resizes every organ a little, misses one (a penalty row) and adds four small false-positive blobs
far away (which stretch those classes' bounding boxes, as real mistakes do).

Timed, median of ``--repeats`` runs each:
- skcdf ``evaluate_case`` (Dice, ASD, HD95, ASSD in voxels) with 1 thread and with all cores, and
  with spacing (adds the three mm metrics);
- the same bounding-box crops with scipy's ``distance_transform_edt`` instead of the KD-tree (the
  design this replaced; shows what the KD-tree buys);
- medpy ``dc`` + ``asd`` per class (what SPEC §4 reports), once, on ``--medpy-classes`` classes
  and extrapolated to 13 (medpy's cost per class hardly depends on the class: it erodes and
  distance-transforms the whole volume every time); medpy ``dc + asd + hd95 + assd`` (the same
  numbers as skcdf's) on ``--medpy-full-classes`` classes, extrapolated likewise.
Every skcdf value is checked against medpy's on the classes medpy ran.

With ``--folder-cases N``, also times ``evaluate_folders`` on N such cases written as .nii.gz
(ground truth with spacing, so the mm metrics run too) with 1 worker process and with one per core.

    .venv/bin/python benchmarks/metrics.py [--repeats 3] [--medpy-classes 3] [--medpy-full-classes 1]
                                           [--folder-cases 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from medpy.metric import binary as medpy
from scipy import ndimage

from skcdf.evaluation import evaluate_folders
from skcdf.metrics import class_boxes, evaluate_case, surface_voxels

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs

SHAPE = (200, 512, 512)
SPACING = (2.5, 0.7, 0.7)
CLASSES = tuple(range(1, 14))
# (centre as a fraction of the volume (z, y, x), radii in voxels (z, y, x)) per organ, label 1..13.
ORGANS = [
    ((.50, .40, .78), (25, 45, 40)), ((.55, .68, .25), (28, 30, 25)), ((.55, .68, .75), (28, 30, 25)),
    ((.42, .55, .38), (12, 16, 14)), ((.50, .62, .52), (90, 7, 7)), ((.45, .42, .28), (45, 100, 90)),
    ((.35, .35, .60), (28, 50, 50)), ((.50, .70, .52), (95, 11, 11)), ((.50, .70, .44), (90, 12, 10)),
    ((.50, .55, .46), (14, 10, 25)), ((.55, .55, .58), (12, 18, 55)), ((.38, .66, .36), (10, 10, 7)),
    ((.38, .66, .64), (10, 10, 7)),
]
MISSED_ORGAN = 12


def paint_ellipsoid(volume: np.ndarray, label: int, centre: np.ndarray, radii: np.ndarray) -> None:
    """Set the voxels of an axis-aligned ellipsoid (clipped to the volume) to ``label``, in place."""
    low = np.maximum(0, np.floor(centre - radii).astype(int))
    high = np.minimum(volume.shape, np.ceil(centre + radii).astype(int) + 1)
    z, y, x = np.ogrid[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    inside = sum(((a - c) / r) ** 2 for a, c, r in zip((z, y, x), centre, radii)) <= 1
    volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]][inside] = label


def synthetic_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference) uint8 label maps of shape SHAPE; see the module docstring."""
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for label, (centre, radii) in enumerate(ORGANS, start=1):
        centre, radii = np.array(centre) * SHAPE, np.array(radii, float)
        paint_ellipsoid(gt, label, centre, radii)
        if label != MISSED_ORGAN:
            paint_ellipsoid(pred, label, centre + rng.normal(0, 2, 3), radii * rng.uniform(0.85, 1.1, 3))
    for label in rng.integers(1, 14, 4):
        paint_ellipsoid(pred, int(label), rng.uniform(0.1, 0.9, 3) * SHAPE, rng.uniform(3, 8, 3))
    return pred, gt


def crop_edt_asd(pred: np.ndarray, gt: np.ndarray) -> list[float]:
    """ASD per class on the bounding-box crops with distance transforms: the alternative to the KD-tree."""
    result = []
    for label, box in zip(CLASSES, class_boxes(pred, gt, CLASSES)):
        pred_mask, gt_mask = pred[box] == label, gt[box] == label
        if not (pred_mask.any() and gt_mask.any()):
            continue
        gt_border = np.zeros(gt_mask.shape, bool)
        gt_border[tuple(surface_voxels(gt_mask).T)] = True
        result.append(ndimage.distance_transform_edt(~gt_border)[tuple(surface_voxels(pred_mask).T)].mean())
    return result


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def medpy_seconds_per_class(pred: np.ndarray, gt: np.ndarray, classes: list[int], full: bool) -> tuple[float, dict]:
    """Mean seconds per class of medpy (dc + asd, or all four metrics) over ``classes``, and its values."""
    values, start = {}, time.perf_counter()
    for label in classes:
        p, g = pred == label, gt == label
        values[label] = {"dice": 100 * medpy.dc(p, g), "asd": medpy.asd(p, g)}
        if full:
            values[label] |= {"hd95": medpy.hd95(p, g), "assd": medpy.assd(p, g)}
    return (time.perf_counter() - start) / len(classes), values


def folder_seconds(pred: np.ndarray, gt: np.ndarray, cases: int, workers: list[int]) -> dict[int, float]:
    """Seconds of evaluate_folders over ``cases`` copies of the pair (as .nii.gz) per worker count."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        folders = {name: Path(tmp, name) for name in ("pred", "gt")}
        for name, labels in (("pred", pred), ("gt", gt)):
            folders[name].mkdir()
            image = sitk.GetImageFromArray(labels)
            image.SetSpacing(tuple(reversed(SPACING)))
            for case in range(cases):
                sitk.WriteImage(image, str(folders[name] / f"case{case:02d}.nii.gz"), useCompression=True)
        seconds = {}
        for count in workers:
            start = time.perf_counter()
            evaluate_folders(folders["pred"], folders["gt"], Path(tmp, f"eval{count}"), workers=count)
            seconds[count] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--medpy-classes", type=int, default=3, help="classes medpy dc+asd runs on (1..13)")
    parser.add_argument("--medpy-full-classes", type=int, default=1, help="classes medpy's four metrics run on")
    parser.add_argument("--folder-cases", type=int, default=0, help="also time evaluate_folders on this many cases")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    print(f"machine: {cpu_name()}, {cores} usable core(s); load average {os.getloadavg()[0]:.1f}; numpy {np.__version__}")
    pred, gt = synthetic_pair()
    print(f"label maps: {SHAPE} uint8, {len(CLASSES)} classes; repeats: {args.repeats} (median)")

    ours = {
        "skcdf evaluate_case, 1 thread": lambda: evaluate_case(pred, gt, CLASSES, threads=1),
        f"skcdf evaluate_case, {cores} threads": lambda: evaluate_case(pred, gt, CLASSES, threads=cores),
        f"skcdf evaluate_case + mm metrics, {cores} threads": lambda: evaluate_case(pred, gt, CLASSES, SPACING),
        "bounding-box crops + distance_transform_edt (ASD only)": lambda: crop_edt_asd(pred, gt),
    }
    timings = {name: median_seconds(work, args.repeats) for name, work in ours.items()}

    # Spread the medpy classes over organ sizes (largest, smallest, ...): its cost barely depends on them.
    by_size = sorted((c for c in CLASSES if c != MISSED_ORGAN), key=lambda c: -np.count_nonzero(gt == c))
    spread = [by_size[i] for i in np.linspace(0, len(by_size) - 1, max(args.medpy_classes, 1)).round().astype(int)]
    per_class, medpy_values = medpy_seconds_per_class(pred, gt, spread, full=False)
    timings[f"medpy dc + asd (x13 from {len(spread)} classes)"] = per_class * len(CLASSES)
    full_classes = spread[: max(args.medpy_full_classes, 1)]
    per_class_full, medpy_full = medpy_seconds_per_class(pred, gt, full_classes, full=True)
    timings[f"medpy dc + asd + hd95 + assd (x13 from {len(full_classes)})"] = per_class_full * len(CLASSES)

    rows = {row["class"]: row for row in evaluate_case(pred, gt, CLASSES)}
    for label, expected in (medpy_values | medpy_full).items():
        for metric, value in expected.items():
            assert abs(rows[label][metric] - value) < 1e-6, (label, metric, rows[label][metric], value)
    print("skcdf values equal medpy's (to 1e-6) on the classes medpy ran\n")

    reference = timings[f"skcdf evaluate_case, {cores} threads"]
    print(f"{'what':<62} {'seconds':>9} {'vs skcdf':>9}")
    for name, seconds in timings.items():
        print(f"{name:<62} {seconds:9.2f} {seconds / reference:8.1f}x")
    if args.folder_cases:
        for count, seconds in folder_seconds(pred, gt, args.folder_cases, sorted({1, cores})).items():
            print(f"evaluate_folders, {args.folder_cases} .nii.gz cases, {count} worker(s): {seconds:.2f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
