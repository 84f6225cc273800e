"""Segmentation losses of the SKCDF step (SPEC §2): Dice + cross-entropy, plain and balanced.

``dice_ce`` is the reference's nnU-Net style loss: voxel-mean cross-entropy plus
(1 − mean over foreground classes of the soft Dice), the Dice sums taken over the whole batch
at once ("batch dice", smooth 1, background excluded). Per-class sums are gathered with
``index_add_`` on the label instead of a one-hot tensor, which saves a K-times larger buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BALANCE_MODES = ("reference", "exclude", "adjusted", "decoupled")
_SMOOTH = 1.0
_EPSILON = 1e-8  # the reference's extra term in the Dice denominator


def _class_sums(probs: Tensor, labels: Tensor, weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class sums over batch and voxels: (intersection, predicted mass, label count), each (K,).

    probs (b,K,D,H,W) softmax; labels (b,D,H,W) int64; weight (b,D,H,W) float or None (all ones).
    """
    num_classes = probs.shape[1]
    prob_of_label = probs.gather(1, labels.unsqueeze(1)).squeeze(1)  # (b,D,H,W)
    ones = torch.ones_like(prob_of_label) if weight is None else weight
    if weight is not None:
        prob_of_label = prob_of_label * weight
        probs = probs * weight.unsqueeze(1)
    flat_labels = labels.reshape(-1)
    zeros = probs.new_zeros(num_classes)
    intersection = zeros.index_add(0, flat_labels, prob_of_label.reshape(-1))
    label_count = zeros.index_add(0, flat_labels, ones.reshape(-1))
    predicted = probs.sum((0, 2, 3, 4))
    return intersection, predicted, label_count


def _dice_ce(logits: Tensor, labels: Tensor, weight: Tensor | None) -> Tensor:
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # losses in fp32 under autocast; fp32 and fp64 inputs keep their precision
    ce_per_voxel = F.cross_entropy(logits, labels, reduction="none")
    if weight is None:
        ce = ce_per_voxel.mean()
    else:
        ce = (ce_per_voxel * weight).sum() / weight.sum().clamp_min(1.0)
    intersection, predicted, label_count = _class_sums(logits.softmax(1), labels, weight)
    dice = (2 * intersection + _SMOOTH) / (predicted + label_count + _SMOOTH + _EPSILON)
    return ce + 1.0 - dice[1:].mean()


def dice_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Reference DiceCE: CE (mean over voxels) + 1 − mean foreground batch soft Dice (smooth 1).

    logits (b,K,D,H,W) any float dtype; labels (b,D,H,W) int64 in [0, K). Returns a 0-d tensor in
    the logits' precision (fp32 for half-precision logits).
    """
    return _dice_ce(logits, labels, None)


def balanced_dice_ce(logits: Tensor, labels: Tensor, mask: Tensor, mode: str = "reference",
                     keep_probability: Tensor | None = None) -> Tensor:
    """DiceCE restricted by a voxel mask (the auxiliary balanced head's loss).

    logits (b,K,D,H,W); labels (b,D,H,W) int64; mask (b,D,H,W) of 0/1 (any dtype).
    mode "reference": multiply logits and labels by the mask, then plain DiceCE (masked voxels become
      background with uniform logits and carry no gradient, but still count in the CE mean and the
      Dice denominators) — what produced the published numbers.
    mode "exclude": masked voxels are left out of the CE mean and of every Dice sum.
    mode "adjusted": "exclude" on logits + log(keep_probability) (logit adjustment, Menon et al.,
      ICLR 2021). The kept voxels over-represent class c by keep_probability[c]; adding its log
      inside the loss lets the head's own logits estimate the class posterior of the unmasked data,
      so the head still learns from a class-balanced sample but predicts without the sample's prior.
    mode "decoupled": the loss of "exclude"; the trainer also stops its gradient at the head's input
      (``Decoder.detach_aux``), so only the head learns from it, and blends the head into the main
      head with its re-balanced prior taken out (``KnowledgeTransfer.set_prior_shift``).
    keep_probability (K,): the mask's per-class keep probabilities ("adjusted" only).
    """
    if mode == "reference":
        return _dice_ce(logits * mask.unsqueeze(1).to(logits.dtype), labels * mask.to(labels.dtype), None)
    precision = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if mode in ("exclude", "decoupled"):
        return _dice_ce(logits, labels, mask.to(precision))
    if mode == "adjusted":
        if keep_probability is None:
            raise ValueError("balance mode 'adjusted' needs the mask's keep probabilities")
        shift = keep_probability.to(device=logits.device, dtype=precision).log().view(1, -1, *[1] * (logits.ndim - 2))
        return _dice_ce(logits.to(precision) + shift, labels, mask.to(precision))
    raise ValueError(f"unknown balance mode {mode!r}; expected one of {BALANCE_MODES}")
