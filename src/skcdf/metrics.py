"""Segmentation metrics per class: Dice, ASD, HD95 and ASSD, equal to medpy's and much faster.

Definitions (SPEC §4, medpy.metric.binary with connectivity 1):

- Dice (%) = 200·|P∩G| / (|P| + |G|).
- The *surface* of a mask is ``mask XOR binary_erosion(mask, generate_binary_structure(ndim, 1))``
  with voxels outside the volume counting as background (scipy's ``border_value=0``).
- ``d(P→G)``: for every surface voxel of P, the Euclidean distance to the nearest surface voxel of G.
- ASD = mean d(P→G) (one-directional, medpy's ``asd(result=P, reference=G)``);
  HD95 = 95th percentile of d(P→G) ∪ d(G→P); ASSD = mean of d(P→G) ∪ d(G→P) (medpy ≥ 0.5).
- Empty sides: both non-empty → computed; exactly one empty → Dice 0, ASD/HD95/ASSD = 128 voxels
  (fixed penalty) and NaN in mm; both empty → Dice 100, distances 0.

Why this is fast (numbers in docs/metrics.md): everything for a class happens in the bounding box of
that class in P ∪ G (one ``find_objects`` pass per label map gives all boxes), erosion is done with
shifted views of a zero-padded crop, and nearest-surface distances come from a KD-tree over the
surface voxels (queried on several cores) instead of a distance transform over the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import KDTree

from skcdf.parallel import available_cores

# SPEC §4: surface distance (voxels) reported when exactly one of prediction / reference is empty.
EMPTY_PENALTY = 128.0

DISTANCE_METRICS = ("asd", "hd95", "assd")
MM_METRICS = tuple(f"{name}_mm" for name in DISTANCE_METRICS)
METRICS = ("dice",) + DISTANCE_METRICS + MM_METRICS

Box = tuple[slice, ...]


def _check_label_maps(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    for name, array in (("prediction", pred), ("ground truth", gt)):
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(f"{name} must hold integer labels, got dtype {array.dtype}")
    # find_objects wants integer labels; bool masks become 0/1 maps (class 1).
    return pred.view(np.uint8) if pred.dtype == bool else pred, gt.view(np.uint8) if gt.dtype == bool else gt


def class_boxes(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int]) -> list[Box | None]:
    """Bounding box of each class in ``pred ∪ gt`` (None where the class is in neither).

    pred, gt: integer label maps of the same shape (any ndim). One ``find_objects`` pass over each
    map gives the boxes of all labels at once. Class 0 (background) gets the whole volume.
    """
    top = max(classes, default=0)
    pred_boxes = ndimage.find_objects(pred, max_label=top) if top > 0 else []
    gt_boxes = ndimage.find_objects(gt, max_label=top) if top > 0 else []
    whole = tuple(slice(0, n) for n in pred.shape)
    boxes: list[Box | None] = []
    for label in classes:
        if label == 0:
            boxes.append(whole)
            continue
        found = [box for box in (pred_boxes[label - 1], gt_boxes[label - 1]) if box is not None]
        if not found:
            boxes.append(None)
        else:
            boxes.append(tuple(slice(min(s.start for s in axis), max(s.stop for s in axis)) for axis in zip(*found)))
    return boxes


def _class_masks(pred: np.ndarray, gt: np.ndarray, label: int, box: Box | None) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of ``label`` in ``pred`` and ``gt`` cropped to ``box`` (empty arrays for no box)."""
    if box is None:
        empty = np.zeros((0,) * pred.ndim, bool)
        return empty, empty
    return pred[box] == label, gt[box] == label


def _dice_percent(pred_mask: np.ndarray, gt_mask: np.ndarray) -> float:
    n_both = np.count_nonzero(pred_mask) + np.count_nonzero(gt_mask)
    if n_both == 0:
        return 100.0  # both empty (SPEC §4)
    return 200.0 * np.count_nonzero(pred_mask & gt_mask) / n_both


def dice_per_class(pred: np.ndarray, gt: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Dice (%) of each class; SPEC §4 conventions (one side empty → 0, both empty → 100).

    pred, gt: integer label maps of the same shape (any ndim). Returns float64 array (len(classes),).
    """
    pred, gt = _check_label_maps(pred, gt)
    boxes = class_boxes(pred, gt, classes)
    return np.array([_dice_percent(*_class_masks(pred, gt, label, box)) for label, box in zip(classes, boxes)])


def _erode(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_erosion(mask, footprint)`` (border_value 0), via shifted views.

    Several times faster than scipy for small footprints. The zero padding plays the volume
    border: a crop that contains the whole object has only background outside it, so eroding the
    crop equals eroding the full volume, at the true volume border included.
    """
    padded = np.pad(mask, 1)
    eroded = mask.copy()
    for offset in np.argwhere(footprint) - 1:  # footprint is 3×3×… centred on the voxel
        eroded &= padded[tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, mask.shape))]
    return eroded


def surface_voxels(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Coordinates (n, ndim) int64 of the surface voxels of a boolean mask, as medpy defines them.

    Surface = mask XOR erosion(mask) with ``generate_binary_structure(ndim, connectivity)``.
    """
    footprint = ndimage.generate_binary_structure(mask.ndim, connectivity)
    return np.argwhere(mask & ~_erode(mask, footprint))


def nearest_distances(
    points: np.ndarray, targets: np.ndarray, spacing: Sequence[float] | None = None, threads: int = 1
) -> np.ndarray:
    """Euclidean distance (n,) from each of ``points`` (n, ndim) to the nearest of ``targets`` (m, ndim).

    Voxel coordinates; ``spacing`` (one per axis) scales them to physical units. This equals medpy's
    ``distance_transform_edt(~target_surface, sampling=spacing)[point_surface]`` exactly.
    """
    scale = np.ones(points.shape[1]) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return KDTree(targets * scale).query(points * scale, workers=threads)[0]


def _distance_metrics(
    pred_surface: np.ndarray, gt_surface: np.ndarray, spacing: Sequence[float] | None, threads: int
) -> list[float]:
    """[ASD, HD95, ASSD] from surface coordinates (n, ndim) and (m, ndim); both non-empty."""
    pred_to_gt = nearest_distances(pred_surface, gt_surface, spacing, threads)
    both_ways = np.concatenate([pred_to_gt, nearest_distances(gt_surface, pred_surface, spacing, threads)])
    return [float(pred_to_gt.mean()), float(np.percentile(both_ways, 95)), float(both_ways.mean())]


def _class_row(
    pred: np.ndarray,
    gt: np.ndarray,
    label: int,
    box: Box | None,
    spacing: Sequence[float] | None,
    connectivity: int,
    threads: int,
) -> dict:
    """Metrics of one class inside its box (see evaluate_case)."""
    pred_mask, gt_mask = _class_masks(pred, gt, label, box)
    n_pred, n_gt = np.count_nonzero(pred_mask), np.count_nonzero(gt_mask)
    mm_unknown = [math.nan] * len(MM_METRICS)
    if n_pred and n_gt:
        pred_surface = surface_voxels(pred_mask, connectivity)
        gt_surface = surface_voxels(gt_mask, connectivity)
        voxel = _distance_metrics(pred_surface, gt_surface, None, threads)
        mm = mm_unknown if spacing is None else _distance_metrics(pred_surface, gt_surface, spacing, threads)
    elif n_pred or n_gt:
        voxel, mm = [EMPTY_PENALTY] * len(DISTANCE_METRICS), mm_unknown
    else:
        voxel = [0.0] * len(DISTANCE_METRICS)
        mm = mm_unknown if spacing is None else [0.0] * len(MM_METRICS)
    return {
        "class": int(label),
        "dice": float(_dice_percent(pred_mask, gt_mask)),
        **dict(zip(DISTANCE_METRICS, voxel)),
        **dict(zip(MM_METRICS, mm)),
        "pred_voxels": int(n_pred),
        "gt_voxels": int(n_gt),
    }


def evaluate_case(
    pred: np.ndarray,
    gt: np.ndarray,
    classes: Sequence[int],
    spacing: Sequence[float] | None = None,
    *,
    connectivity: int = 1,
    threads: int | None = None,
) -> list[dict]:
    """All metrics of one case, one row per class.

    pred, gt: integer label maps of the same shape, e.g. (D, H, W). spacing: physical voxel size per
    axis in the arrays' axis order (e.g. (z, y, x) mm), or None. threads: for the nearest-surface
    queries (default: the usable CPU cores).
    Returns [{"class", "dice" (%), "asd", "hd95", "assd" (voxels), "asd_mm", "hd95_mm", "assd_mm"
    (NaN without spacing), "pred_voxels", "gt_voxels"}, ...] in the order of ``classes``.
    """
    pred, gt = _check_label_maps(pred, gt)
    if spacing is not None and len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not have one value per axis of shape {pred.shape}")
    threads = threads or available_cores()
    return [
        _class_row(pred, gt, label, box, spacing, connectivity, threads)
        for label, box in zip(classes, class_boxes(pred, gt, classes))
    ]
