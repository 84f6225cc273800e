"""DHC (Wang & Li, MICCAI 2023: dual-debiased heterogeneous co-training) as ``code/train_dhc.py`` trains it.

CPS between two VNets (both kaiming-normal initialised), each with its own class weights in both its
supervised and its pseudo-supervised loss:

    loss = DiceCE_wA(A(x_l), y) + DiceCE_wB(B(x_l), y) + w · [CE_wA(A(x), argmax B(x)) + CE_wB(B(x), argmax A(x))]

* w_A, difficulty-aware (DiffDW, :class:`DiffDW`): from the hard Dice of A's prediction on the labeled batch,
  how much each class is still being learned or unlearned, times its EMA'd 1 − Dice.
* w_B, distribution-aware (DistDW, :class:`DistDW`): log(N_max / N_c) normalised, first from the labeled
  set's class counts, then an EMA over B's predicted class counts on the unlabeled batch.

Both are scaled so that their maximum is K and are recomputed from the current (detached) outputs before
the losses of each iteration. DiceCE_w is CE weighted by w (mean normalised by Σ w[label]) minus the mean
over foreground classes of w_c · Dice_c (:func:`~skcdf.methods.common.dice_ce`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule
from skcdf.methods.cps_pair import (PAIR_LOSS_TERMS, PairLosses, PairState, cps_pair_step,
                                    pair_recipe, weighted_pair_losses)
from skcdf.methods.plugin import Context

#: Loss terms returned by :func:`dhc_step`.
LOSS_TERMS = PAIR_LOSS_TERMS


def _ema(current: Tensor, past: Tensor, momentum: float) -> Tensor:
    """DHC's ``EMA``: momentum · past + (1 − momentum) · current."""
    return momentum * past + (1 - momentum) * current


def _class_counts(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    return torch.bincount(labels.reshape(-1), minlength=num_classes).to(dtype)


def _hard_dice(prediction: Tensor, labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Batch Dice of two label maps (b, …) per class including background, smooth 1e-8: (K,)."""
    tp = _class_counts(labels[prediction == labels], num_classes, dtype)
    size = _class_counts(prediction, num_classes, dtype) + _class_counts(labels, num_classes, dtype)  # 2tp+fp+fn
    return (2 * tp + 1e-8) / (size + 1e-8 + 1e-8)


@dataclass
class DiffDW:
    """Difficulty-aware class weights (DHC's ``DiffDW(num_cls, accumulate_iters=50)``), one per class, (K,).

    State: ``last_dice`` (Dice of the previous iteration, 1e-8 at first), ``cls_learn`` / ``cls_unlearn``
    (EMAs of the per-class learning / unlearning amounts), ``dice_weight`` (EMA of 1 − Dice, 1 at first).
    ``normalise``: scale the weights so that their maximum is K (DHC); off, they are K · w (GenericSSL's
    ``Difficulty``, which is otherwise the same code).
    """

    num_classes: int
    accumulate_iters: int = 50
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    normalise: bool = True
    last_dice: Tensor = field(init=False)
    cls_learn: Tensor = field(init=False)
    cls_unlearn: Tensor = field(init=False)
    dice_weight: Tensor = field(init=False)

    def __post_init__(self) -> None:
        zeros = torch.zeros(self.num_classes, dtype=self.dtype, device=self.device)
        self.last_dice = zeros + 1e-8
        self.cls_learn, self.cls_unlearn = zeros.clone(), zeros.clone()
        self.dice_weight = torch.ones_like(zeros)

    def update(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Update from A's labeled-batch logits (b, K, D, H, W) and labels (b, D, H, W); return w_A (K,).

        d = hard batch Dice per class; Δ = d − d_prev; learn = max(Δ, 0)·ln(d/d_prev),
        unlearn = min(Δ, 0)·ln(d/d_prev), both EMA'd with momentum (τ−1)/τ;
        w = ((unlearn + 1e-8)/(learn + 1e-8))^(1/5) · EMA(1 − d); returned as K · w / max w
        (``normalise``) or K · w.
        """
        dice = _hard_dice(logits.detach().argmax(1), labels, self.num_classes, self.dtype)
        delta = dice - self.last_dice
        log_ratio = torch.log(dice / self.last_dice)
        learn = torch.where(delta > 0, delta, 0) * log_ratio
        unlearn = torch.where(delta <= 0, delta, 0) * log_ratio
        self.last_dice = dice
        momentum = (self.accumulate_iters - 1) / self.accumulate_iters
        self.cls_learn = _ema(learn, self.cls_learn, momentum)
        self.cls_unlearn = _ema(unlearn, self.cls_unlearn, momentum)
        difficulty = torch.pow((self.cls_unlearn + 1e-8) / (self.cls_learn + 1e-8), 1 / 5)
        self.dice_weight = _ema(1.0 - dice, self.dice_weight, momentum)
        weights = difficulty * self.dice_weight
        return weights / weights.max() * self.num_classes if self.normalise else weights * self.num_classes

    def state_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).clone() for k in ("last_dice", "cls_learn", "cls_unlearn", "dice_weight")}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, value in state.items():
            setattr(self, key, value.to(dtype=self.dtype, device=self.device).clone())


@dataclass
class DistDW:
    """Distribution-aware class weights (DHC's ``DistDW(num_cls, momentum=0.99)``), (K,).

    w(n) = K · ln(P) / max ln(P), P_c = (max n + 1e-8) / (n_c + 1e-8), for class voxel counts n.
    ``weights`` starts from the labeled set's counts (:meth:`init_from_counts`).
    """

    num_classes: int
    momentum: float = 0.99
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"
    weights: Tensor | None = None

    def _weights(self, counts: Tensor) -> Tensor:
        counts = counts.to(dtype=self.dtype, device=self.device)
        log_p = torch.log((counts.max() + 1e-8) / (counts + 1e-8))
        return log_p / log_p.max() * self.num_classes

    def init_from_counts(self, counts: Tensor) -> Tensor:
        """Initial weights from the labeled set's voxel count per class (K,)."""
        self.weights = self._weights(counts)
        return self.weights

    def update(self, logits: Tensor) -> Tensor:
        """EMA towards the weights of B's predicted class counts on the unlabeled batch; return w_B (K,).

        logits (b_u, K, D, H, W)."""
        if self.weights is None:
            raise RuntimeError("DistDW.init_from_counts must be called before training")
        counts = _class_counts(logits.detach().argmax(1), self.num_classes, self.dtype)
        self.weights = _ema(self._weights(counts), self.weights, self.momentum)
        return self.weights

    def state_dict(self) -> dict[str, Tensor]:
        return {"weights": self.weights.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.weights = state["weights"].to(dtype=self.dtype, device=self.device).clone()


@dataclass
class DHCConfig(WeightSchedule):
    """Hyper-parameters of DHC's ``train_dhc.py`` (values: DHC's README command, ``-w 0.1 -ep 300``;
    ``-r`` is on by default in this script). The DiffDW and DistDW momenta are fixed in the script."""

    diffdw_accumulate_iters: int = 50
    distdw_momentum: float = 0.99


@dataclass
class DHCState(PairState):
    """Network B, its optimiser and the two class-weight statistics."""

    diffdw: DiffDW
    distdw: DistDW

    @classmethod
    def create(cls, net_b: nn.Module, optimizer_b: torch.optim.Optimizer, labeled_class_counts: Tensor,
               config: DHCConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "DHCState":
        """Fresh statistics (:func:`fresh_statistics`) beside B and its optimiser."""
        return cls(net_b, optimizer_b, *fresh_statistics(labeled_class_counts, config, dtype, device))


def fresh_statistics(labeled_class_counts: Tensor, config: DHCConfig, dtype: torch.dtype = torch.float32,
                     device: torch.device | str = "cpu") -> tuple[DiffDW, DistDW]:
    """DiffDW and DistDW for training from scratch; DistDW starts from the labeled set's class counts (K,)."""
    num_classes = int(labeled_class_counts.numel())
    distdw = DistDW(num_classes, config.distdw_momentum, dtype, device)
    distdw.init_from_counts(labeled_class_counts)
    return DiffDW(num_classes, config.diffdw_accumulate_iters, dtype, device), distdw


def dhc_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: DHCState, x_labeled: Tensor,
             y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: DHCConfig) -> dict[str, Any]:
    """One DHC iteration: both forwards on [x_l; x_u], new class weights, the loss above, one step each.

    Args:
        net_a, optimizer_a: network A (DiffDW-weighted) and its optimiser; B (DistDW) is in ``state``.
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch (sets the weight).
    Returns:
        ``LOSS_TERMS`` as floats, plus ``weight_A`` and ``weight_B``, the (K,) class weights used.
    """
    n = x_labeled.shape[0]

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        weight_a = state.diffdw.update(out_a[:n].detach(), y_labeled)
        weight_b = state.distdw.update(out_b[n:].detach())
        extras = {"weight_A": weight_a.detach().clone(), "weight_B": weight_b.detach().clone()}
        return weighted_pair_losses(out_a, out_b, y_labeled, weight_a, weight_b)._replace(extras=extras)

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


def _statistics(config: DHCConfig, context: Context) -> tuple[DiffDW, DistDW]:
    return fresh_statistics(context.labeled_class_counts, config, device=context.device)


# DHC initialises both networks kaiming-normal
RECIPE = pair_recipe(DHCState, DHCConfig, dhc_step, _statistics, init_b=nn.init.kaiming_normal_)
