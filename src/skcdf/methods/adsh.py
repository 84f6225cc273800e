"""Adaptive thresholding (Adsh; Guo & Li, ICML 2022) as DHC's ``code/train_adsh.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps_pair.vnet_pair`).
Each network keeps an :class:`AdshBank` of the softmax of its recent unlabeled outputs, from which it
derives one threshold per class. With x = [x_l; x_u] and logits o_A, o_B over the whole batch:

    t_A = bank_A.thresholds(o_A(x_u))                         (store, or recompute from the bank; see below)
    S_A[c] = 1(softmax(o_A)[c] > t_A[c])                      (b, K, D, H, W), per class and voxel
    loss = DiceCE(o_A(x_l), y) + DiceCE(o_B(x_l), y)
           + λ(epoch) · [mean CE(o_A ⊙ S_B, argmax o_B) + mean CE(o_B ⊙ S_A, argmax o_A)]

As in DHC's code: the sampling map multiplies the *logits* class by class (a class below its threshold
gets logit 0 at that voxel; no voxel is left out), and the mean runs over all voxels.

The bank holds ``size`` samples (DHC: the unlabeled set's size // 4). While fewer than ``size − 1`` are
stored, a call stores the batch and returns the thresholds unchanged; otherwise it recomputes them from
the bank — the current batch is not stored — and empties it. Recomputing: over the bank's argmax, the
majority class m and its voxel count N_m; ρ = (#{bank voxels whose class-m score exceeds 0.9} + 1e-8)
/ (N_m + 1e-8); for each class c, t_c is the ⌊ρ·N_c⌋-th largest class-c score over
*all* bank voxels (N_c the voxels whose argmax is c). The thresholds start at 0, which keeps every logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule, dice_ce
from skcdf.methods.cps_pair import PAIR_LOSS_TERMS, PairLosses, PairState, cps_pair_step, pair_recipe
from skcdf.methods.plugin import Context

#: Loss terms returned by :func:`adsh_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS


@dataclass
class AdshConfig(WeightSchedule):
    """Hyper-parameters of ``train_adsh.py`` (README command ``-w 0.1 -ep 300 -r``; the majority-class
    confidence 0.9 is fixed in the script)."""

    thresh_major: float = 0.9


class AdshBank:
    """DHC's ``ADSH``: a bank of ``size`` softmax maps (size, K, *patch) and the per-class thresholds (K,)."""

    def __init__(self, num_classes: int, patch: Sequence[int], size: int, thresh_major: float = 0.9,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.num_classes, self.size, self.thresh_major = num_classes, size, thresh_major
        self.scores = torch.zeros((size, num_classes, *patch), dtype=dtype, device=device)
        self.thresholds = torch.zeros(num_classes, dtype=dtype, device=device)
        self.count = 0  # DHC's cur_iter: samples stored since the last recomputation

    def thresholds_for(self, logits_unlabeled: Tensor) -> Tensor:
        """DHC's ``get_thresholds``: store the batch's softmax (b, K, …) or recompute; returns the thresholds
        (the bank's own tensor, as DHC, so a later recomputation changes it in place)."""
        b = logits_unlabeled.shape[0]
        if self.count < self.size - 1:
            self.scores[self.count:self.count + b] = F.softmax(logits_unlabeled.detach(), dim=1)
            self.count += b
            return self.thresholds
        self.recompute()
        return self.thresholds

    def recompute(self) -> None:
        scores = self.scores.reshape(self.size, self.num_classes, -1)  # (n, K, V)
        counts = torch.bincount(scores.argmax(1).reshape(-1), minlength=self.num_classes).to(scores.dtype)
        majority = int(torch.argmax(counts))
        confident = (scores[:, majority] > self.thresh_major).sum().to(scores.dtype)
        rho = (confident + 1e-8) / (counts[majority] + 1e-8)
        stacked = scores.permute(1, 0, 2).reshape(self.num_classes, -1)  # per class, samples one after another
        for c in range(self.num_classes):
            ranked, _ = torch.sort(stacked[c], dim=0, descending=True)
            self.thresholds[c] = ranked[int(rho * counts[c])]
        self.count = 0

    @staticmethod
    def sampling_map(logits: Tensor, thresholds: Tensor) -> Tensor:
        """DHC's ``cal_sampling_mask``: 1 where softmax(logits)[c] > thresholds[c], per class: (b, K, …)."""
        probs = F.softmax(logits.detach(), dim=1)
        shape = (1, -1) + (1,) * (logits.ndim - 2)
        return (probs > thresholds.to(probs.dtype).view(shape)).to(logits.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.clone(), "thresholds": self.thresholds.clone(), "count": self.count,
                "thresh_major": self.thresh_major}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = state["scores"].clone()
        self.size, self.num_classes = self.scores.shape[:2]
        self.thresholds = state["thresholds"].clone()
        self.count = int(state["count"])
        self.thresh_major = float(state["thresh_major"])


@dataclass
class AdshState(PairState):
    """Network B, its optimiser, and both networks' banks."""

    bank_a: AdshBank
    bank_b: AdshBank


def masked_logit_ce(logits: Tensor, target: Tensor, sampling_map: Tensor) -> Tensor:
    """DHC's ``ClassDependent_WeightedCrossEntropyLoss``: mean over voxels of CE(logits ⊙ map, target)."""
    return F.cross_entropy(logits * sampling_map.detach(), target, reduction="none").mean()


def adsh_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: AdshState, x_labeled: Tensor,
              y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: AdshConfig) -> dict[str, Any]:
    """One Adsh iteration: both forwards on [x_l; x_u], the banks' thresholds, the loss above, backward,
    both optimisers step.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B and the banks). Returns ``LOSS_TERMS``
    as floats, and ``map_A`` / ``map_B``: per class, the voxels whose logit the sampling map keeps.
    """
    n = x_labeled.shape[0]

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        map_a = AdshBank.sampling_map(out_a, state.bank_a.thresholds_for(out_a[n:]))
        map_b = AdshBank.sampling_map(out_b, state.bank_b.thresholds_for(out_b[n:]))
        extras = {"map_A": _voxels_per_class(map_a), "map_B": _voxels_per_class(map_b)}
        return PairLosses(dice_ce(out_a[:n], y_labeled), dice_ce(out_b[:n], y_labeled),
                          masked_logit_ce(out_a, out_b.detach().argmax(1), map_b),
                          masked_logit_ce(out_b, out_a.detach().argmax(1), map_a), extras)

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


def _voxels_per_class(sampling_map: Tensor) -> list[float]:
    """(K,) voxels whose logit a sampling map (b, K, …) keeps, per class."""
    return sampling_map.sum(dim=(0, *range(2, sampling_map.ndim))).tolist()


def _banks(config: AdshConfig, context: Context) -> tuple[AdshBank, AdshBank]:
    # DHC: tot_iter = (unlabeled cases) // 4 samples; at least one batch, so that the bank fills
    size = max(context.unlabeled_cases // 4, context.batch_unlabeled)
    return tuple(AdshBank(context.num_classes, context.patch_size, size, config.thresh_major, device=context.device)
                 for _ in range(2))


RECIPE = pair_recipe(AdshState, AdshConfig, adsh_step, _banks)
