"""SimiS (Chen et al., 2022) as DHC's ``code/train_simis.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps.init_cps_pair`) in
which both losses of each network are class-weighted by the gap between each class's predicted frequency
and the most frequent class's:

    P_c = (N_c + 1e-8) / (Σ N + 1e-8);   r_c = K · (max P − P_c)
    w_A ← 0.99·w_A + 0.01·r(argmax counts of o_A over the *whole* batch [x_l; x_u])   (before the losses)
    loss = DiceCE_{w_A}(o_A(x_l), y) + DiceCE_{w_B}(o_B(x_l), y)
           + λ(epoch)·[CE_{w_A}(o_A, argmax o_B) + CE_{w_B}(o_B, argmax o_A)]

The weights start at 0.99·K + 0.01·r(labeled counts) — an EMA step from K for every class — so for most of
a run they stay near K. As in DHC, the per-iteration gaps are computed in float32 with numpy and multiplied
by K in the weights' dtype; the initial ones in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from skcdf.methods.common import cross_entropy, dice_ce, weight_during_epoch
from skcdf.methods.crest import class_counts

#: Loss terms returned by :func:`simis_step`, in DHC's names.
LOSS_TERMS = ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "cps_w", "total")


def simis_gaps(counts: np.ndarray) -> np.ndarray:
    """DHC's ``SimiS._weight_wbg``: max P − P per class (K,), in ``counts``' dtype (not yet times K)."""
    share = (counts + 1e-8) / (np.sum(counts) + 1e-8)
    return np.max(share) - share


@dataclass
class SimiSConfig:
    """Hyper-parameters of ``train_simis.py`` (README command ``-w 0.1 -ep 300 -r``; momentum fixed)."""

    cps_weight: float = 0.1
    max_epoch: int = 300
    rampup: bool = True
    rampup_length: float | None = None
    momentum: float = 0.99

    def weight_at(self, epoch: int) -> float:
        """λ during ``epoch`` (ramped once per epoch, one epoch late, as in DHC)."""
        return weight_during_epoch(epoch, self.cps_weight, self.max_epoch, self.rampup, self.rampup_length)


class SimiSWeights:
    """One network's running class weights (DHC's ``SimiS`` object)."""

    def __init__(self, labeled_counts: np.ndarray, momentum: float = 0.99, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        counts = np.asarray(labeled_counts, dtype=np.float64)
        self.num_classes, self.momentum = counts.shape[0], momentum
        labeled = torch.as_tensor(simis_gaps(counts) * self.num_classes, dtype=dtype, device=device)
        start = torch.full((self.num_classes,), float(self.num_classes), dtype=dtype, device=device)
        self.weights = momentum * start + (1 - momentum) * labeled

    def update(self, logits: Tensor) -> Tensor:
        """EMA towards K·gaps of the argmax counts of ``logits`` (b, K, …); returns the weights."""
        counts = class_counts(logits.detach().argmax(1), self.num_classes).astype(np.float32)
        current = torch.as_tensor(simis_gaps(counts), dtype=self.weights.dtype, device=self.weights.device)
        self.weights = self.momentum * self.weights + (1 - self.momentum) * (current * self.num_classes)
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.num_classes, self.momentum = self.weights.shape[0], float(state["momentum"])


@dataclass
class SimiSState:
    """Network B, its optimiser, and both networks' class weights."""

    net_b: nn.Module
    optimizer_b: torch.optim.Optimizer
    weights_a: SimiSWeights
    weights_b: SimiSWeights

    def state_dict(self) -> dict[str, Any]:
        return {"net_b": self.net_b.state_dict(), "optimizer_b": self.optimizer_b.state_dict(),
                "weights_a": self.weights_a.state_dict(), "weights_b": self.weights_b.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net_b.load_state_dict(state["net_b"])
        self.optimizer_b.load_state_dict(state["optimizer_b"])
        self.weights_a.load_state_dict(state["weights_a"])
        self.weights_b.load_state_dict(state["weights_b"])


def simis_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: SimiSState, x_labeled: Tensor,
               y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: SimiSConfig) -> dict[str, float]:
    """One SimiS iteration: both forwards on [x_l; x_u], the weights' update from the whole batch, the loss
    above, backward, both optimisers step.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B and the weights). Returns ``LOSS_TERMS``
    as floats.
    """
    net_b, optimizer_b = state.net_b, state.optimizer_b
    net_a.train()
    net_b.train()
    optimizer_a.zero_grad()
    optimizer_b.zero_grad()
    n = x_labeled.shape[0]
    x = torch.cat([x_labeled, x_unlabeled], dim=0)
    out_a = net_a(x)
    out_b = net_b(x)
    pseudo_a = out_a.detach().argmax(1)
    pseudo_b = out_b.detach().argmax(1)
    weight_a = state.weights_a.update(out_a)
    weight_b = state.weights_b.update(out_b)
    sup_a = dice_ce(out_a[:n], y_labeled, weight_a)
    sup_b = dice_ce(out_b[:n], y_labeled, weight_b)
    cps_a = cross_entropy(out_a, pseudo_b, weight_a)
    cps_b = cross_entropy(out_b, pseudo_a, weight_b)
    weight = config.weight_at(epoch)
    sup, cps = sup_a + sup_b, cps_a + cps_b
    loss = sup + weight * cps
    loss.backward()
    optimizer_a.step()
    optimizer_b.step()
    values = (sup_a, sup_b, cps_a, cps_b, sup, cps, weight, loss)
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}
