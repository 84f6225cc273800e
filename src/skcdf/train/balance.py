"""Class-balanced voxel masks for the auxiliary heads (SPEC §2, "Balanced masks").

A voxel of class c is kept with probability p_c = min_k n_k / n_c, so rare classes are always kept
and frequent ones thinned out. Masks are drawn by indexing a per-class probability table with the
label map (one gather and one uniform draw, no per-class loop).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def class_keep_probabilities(counts: np.ndarray | list[float]) -> Tensor:
    """p_c = min_k n_k / n_c over the classes present; a class with no voxels gets p = 1.

    counts: (K,) voxel count per class. Returns a float32 tensor (K,) in (0, 1].
    """
    counts_t = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    present = counts_t > 0
    if not bool(present.any()):
        return torch.ones(len(counts_t), dtype=torch.float32)
    smallest = counts_t[present].min()
    probabilities = torch.where(present, smallest / counts_t.clamp_min(1), torch.ones_like(counts_t))
    return probabilities.float()


def unlabeled_keep_probabilities(p: Tensor, epoch: int, max_epoch: int) -> Tensor:
    """q_c = 1 − (epoch / max_epoch)·(1 − p_c): all ones at the start, reaching p at the end. (K,)"""
    progress = min(epoch / max_epoch, 1.0)
    return 1.0 - progress * (1.0 - p)


def sample_balance_mask(keep_probability: Tensor, labels: Tensor) -> Tensor:
    """Bernoulli mask with P(keep voxel) = keep_probability[label of the voxel].

    keep_probability (K,) float32 on the labels' device; labels (b,D,H,W) int64.
    Returns a bool tensor (b,D,H,W). Draws from the device's global generator.
    """
    return torch.rand(labels.shape, device=labels.device) < keep_probability[labels]


def smallest_classes(counts: np.ndarray | list[float], how_many: int = 6) -> list[int]:
    """The ``how_many`` foreground classes with the fewest voxels (index 0, background, excluded),
    smallest first; ties go to the lower index. These are the classes the balanced heads are for,
    and the ones ``val_dice_small_<head>`` in metrics.csv averages over.

    counts: (K,) voxel count per class. Returns class indices in [1, K).
    """
    foreground = np.asarray(counts, dtype=np.float64)[1:]
    order = np.argsort(foreground, kind="stable")[:how_many]
    return [int(index) + 1 for index in order]
