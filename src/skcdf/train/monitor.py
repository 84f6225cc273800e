"""What a run's curves need to show where it goes wrong: the Dice of every head, and the pseudo-labels.

Two cheap measurements, both computed on the device and synced once per validation or epoch:

- :func:`validate_heads`: hard Dice (%) on the validation cases of each of the four heads — D_l main,
  D_l aux, D_u main, D_u aux — on their centre crops (the reference's) or, with ``val_region: whole``,
  on the whole cases by a sliding window. The inference head (D_u main by default) is the paper's
  validation score; the others show which part of the network learns and which collapses.
- :class:`PseudoLabelMonitor`: the quality of the pseudo-labels the step actually trains on (train
  mode, cross-mode SKCM, dropout on), pooled over an epoch: their Dice against the true labels of
  the unlabeled training cases when the data set has them (the phantom does; they never reach the
  loss), and their foreground fraction beside the true one. It adds one ``bincount`` per iteration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from torch import Tensor, nn

#: The four heads, in the order of the columns ``val_dice_<head>``.
HEADS = ("labeled_main", "labeled_aux", "unlabeled_main", "unlabeled_aux")
#: What validation scores (config ``val_region``): each case's centre crop, or the whole case.
VAL_REGIONS = ("crop", "whole")


def confusion_counts(prediction: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Per sample, the (K, K) confusion matrix [true class, predicted class], from one bincount.

    prediction, label: (b, ...) integer label maps on the same device. Returns int64 (b, K, K).
    """
    batch = prediction.shape[0]
    sample = torch.arange(batch, device=prediction.device).view(batch, *([1] * (prediction.ndim - 1)))
    index = (sample * num_classes + label.long()) * num_classes + prediction.long()
    counts = torch.bincount(index.reshape(-1), minlength=batch * num_classes * num_classes)
    return counts.view(batch, num_classes, num_classes)


def dice_from_confusion(confusion: Tensor) -> Tensor:
    """Hard Dice (%) per class from confusion matrices (..., K, K), SPEC §4 conventions.

    Both sides empty → 100, one side empty → 0. Returns float64 (..., K) (background included).
    """
    confusion = confusion.double()
    overlap = torch.diagonal(confusion, dim1=-2, dim2=-1)
    sizes = confusion.sum(-1) + confusion.sum(-2)  # |label| + |prediction| per class
    return torch.where(sizes > 0, 200.0 * overlap / sizes.clamp_min(1), torch.full_like(sizes, 100.0))


@torch.no_grad()
def validate_heads(model: nn.Module, batches: Iterable[dict[str, Tensor]], device: torch.device,
                   num_classes: int, autocast: Callable[[], Any] = contextlib.nullcontext,
                   window: Sequence[int] | None = None, decoder_mean: bool = False,
                   pad_value: float = 0.0) -> dict[str, Tensor]:
    """Per-class hard Dice (%) of each head on the validation cases, averaged over the cases.

    batches: dicts with "image" (b,1,D,H,W) float and "label" (b,D,H,W) int64: centre crops of the
    patch size, or (``window`` given) whole volumes, each scored by a sliding window of ``window``
    (D, H, W) voxels stepping half a window, its probabilities averaged where windows overlap. D_l is
    run as at inference with the labeled decoder (cross mode, each crop paired with itself); D_u by the
    unlabeled flow. Heads the model lacks (no aux heads) are left out. A model with one path
    (``single_path``: one shared decoder and no SKCM, as the baseline and the supervised references,
    or a Table 1 method's MethodNet) runs once. ``decoder_mean`` adds ``"mean_main"``, the mean of the two
    main heads' probabilities (``inference_decoder: mean``). ``pad_value``: what pads a volume smaller
    than ``window`` (the normalised air, as in training and prediction).
    Returns {head: float64 (K-1,) on the CPU}, foreground classes only.
    """
    was_training = model.training
    model.eval()
    totals: dict[str, Tensor] = {}
    cases = 0
    for batch in batches:
        image = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        with autocast():
            outputs = (_head_logits(model, image) if window is None
                       else _whole_case_heads(model, image, window, pad_value))
        if decoder_mean:  # argmax of the mean probabilities; a window's already are probabilities
            scores = [outputs[f"{decoder}_main"] for decoder in ("labeled", "unlabeled")]
            outputs["mean_main"] = sum(s if window is not None else s.float().softmax(1) for s in scores) / 2
        for head, logits in outputs.items():
            dice = dice_from_confusion(confusion_counts(logits.argmax(1), label, num_classes))
            totals[head] = totals.get(head, 0) + dice[:, 1:].sum(0)
        cases += image.shape[0]
    model.train(was_training)
    return {head: (total / max(cases, 1)).cpu() for head, total in totals.items()}


def _head_logits(model: nn.Module, image: Tensor) -> dict[str, Tensor]:
    """{head: logits (b, K, D, H, W)} of the heads the model has, for a batch of patches."""
    labeled = model.forward_labeled_decoder(image)
    outputs = labeled + (labeled if model.single_path else model(image, flow="unlabeled"))
    return {head: logits for head, logits in zip(HEADS, outputs) if logits is not None}


def _whole_case_heads(model: nn.Module, image: Tensor, window: Sequence[int], pad_value: float) -> dict[str, Tensor]:
    """{head: probabilities (b, K, D, H, W)} over whole volumes, by MONAI's sliding window (half-window steps)."""
    heads: list[str] = []

    def probabilities(patches: Tensor) -> tuple[Tensor, ...]:
        outputs = _head_logits(model, patches)
        heads[:] = outputs
        return tuple(logits.float().softmax(1) for logits in outputs.values())

    blended = sliding_window_inference(image, tuple(window), 4, probabilities, overlap=0.5, mode="constant",
                                       cval=pad_value)
    return dict(zip(heads, blended))


class PseudoLabelMonitor:
    """Accumulates, over an epoch, the confusion of the pseudo-labels against the true labels.

    ``update`` takes the step's pseudo-label maps and the true labels of the same unlabeled crops;
    ``summary`` returns the epoch's pooled Dice (mean over foreground classes) and foreground fractions
    and resets. Without true labels only the foreground fractions are reported.
    """

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.num_classes = num_classes
        self.device = device
        self._confusion: dict[str, Tensor] = {}

    def update(self, pseudo_labels: dict[str, Tensor], true_label: Tensor | None) -> None:
        """pseudo_labels: {"main": (B_u,D,H,W), "aux": ...} int64; true_label (B_u,D,H,W) or None (all background)."""
        for name, pseudo in pseudo_labels.items():
            reference = torch.zeros_like(pseudo) if true_label is None else true_label
            counts = confusion_counts(pseudo, reference, self.num_classes).sum(0)
            self._confusion[name] = self._confusion.get(name, 0) + counts

    def summary(self, with_true_labels: bool) -> dict[str, float]:
        """{"pseudo_fg_<name>", "pseudo_dice_<name>", "true_fg"} for the epoch (one host sync); resets."""
        row: dict[str, float] = {}
        for name, confusion in self._confusion.items():
            total = confusion.sum().clamp_min(1)
            row[f"pseudo_fg_{name}"] = float(confusion[:, 1:].sum() / total)
            if with_true_labels:
                row[f"pseudo_dice_{name}"] = float(dice_from_confusion(confusion)[1:].mean())
                row["true_fg"] = float(confusion[1:, :].sum() / total)
        self._confusion = {}
        return row
