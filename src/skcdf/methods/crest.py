"""Class-rebalancing self-training (CReST; Wei et al., CVPR 2021) as DHC's ``code/train_crest.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps.init_cps_pair`) in
which both losses of each network are class-weighted with CReST's sampling rates, turned into weights:

    μ_c = ((N_c + 1e-8) / (max N + 1e-8))^(1/3);  the class with the l-th largest μ gets the l-th smallest μ
    w_A ← 0.99·w_A + 0.01·μ(argmax counts of o_A(x_u))                  (every iteration, before the losses)
    loss = DiceCE_{w_A}(o_A(x_l), y) + DiceCE_{w_B}(o_B(x_l), y)
           + λ(epoch)·[CE_{w_A}(o_A, argmax o_B) + CE_{w_B}(o_B, argmax o_A)]

So the most frequent class gets the rarest class's rate and the rarest class 1 (CReST's eq. 1 with α = 1/3).
The weights start from the labeled set's class counts. Ties in μ keep class order (Python's stable sort,
as DHC). As in DHC, the per-iteration rates are computed in float32 with numpy (the class counts are cast
to float32 first), the initial ones in float64; the EMA runs in the weights' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from skcdf.methods.common import cross_entropy, dice_ce, weight_during_epoch

#: Loss terms returned by :func:`crest_step`, in DHC's names.
LOSS_TERMS = ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "cps_w", "total")


def crest_rates(counts: np.ndarray) -> np.ndarray:
    """DHC's ``CReST._weight_wbg``: per-class weights (K,) float64 from class counts (K,).

    The arithmetic runs in ``counts``' dtype (float32 for the per-iteration counts, float64 for the labeled
    set's), as numpy does in DHC.
    """
    num_classes = counts.shape[0]
    mu = np.power((counts + 1e-8) / (np.amax(counts) + 1e-8), 1 / 3)
    order = sorted(range(num_classes), key=lambda c: mu[c], reverse=True)  # stable: ties keep class order
    weight = np.zeros(num_classes)
    for rank, cls in enumerate(order):
        weight[cls] = mu[order[num_classes - 1 - rank]]
    return weight


def class_counts(labels: Tensor, num_classes: int) -> np.ndarray:
    """Voxel count per class of an integer label map, float64 (K,)."""
    return torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).numpy().astype(np.float64)


@dataclass
class CReSTConfig:
    """Hyper-parameters of ``train_crest.py`` (README command ``-w 0.1 -ep 300 -r``; momentum fixed)."""

    cps_weight: float = 0.1
    max_epoch: int = 300
    rampup: bool = True
    rampup_length: float | None = None
    momentum: float = 0.99

    def weight_at(self, epoch: int) -> float:
        """λ during ``epoch`` (ramped once per epoch, one epoch late, as in DHC)."""
        return weight_during_epoch(epoch, self.cps_weight, self.max_epoch, self.rampup, self.rampup_length)


class CReSTWeights:
    """One network's running class weights (DHC's ``CReST`` object)."""

    def __init__(self, labeled_counts: np.ndarray, momentum: float = 0.99, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.momentum = momentum
        self.weights = torch.as_tensor(crest_rates(np.asarray(labeled_counts, dtype=np.float64)), dtype=dtype,
                                       device=device)

    def update(self, logits_unlabeled: Tensor) -> Tensor:
        """EMA towards the rates of the argmax counts of ``logits_unlabeled`` (b, K, …); returns the weights."""
        num_classes = logits_unlabeled.shape[1]
        counts = class_counts(logits_unlabeled.detach().argmax(1), num_classes).astype(np.float32)
        current = torch.as_tensor(crest_rates(counts), dtype=self.weights.dtype, device=self.weights.device)
        self.weights = self.momentum * self.weights + (1 - self.momentum) * current
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.momentum = float(state["momentum"])


@dataclass
class CReSTState:
    """Network B, its optimiser, and both networks' class weights."""

    net_b: nn.Module
    optimizer_b: torch.optim.Optimizer
    weights_a: CReSTWeights
    weights_b: CReSTWeights

    def state_dict(self) -> dict[str, Any]:
        return {"net_b": self.net_b.state_dict(), "optimizer_b": self.optimizer_b.state_dict(),
                "weights_a": self.weights_a.state_dict(), "weights_b": self.weights_b.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net_b.load_state_dict(state["net_b"])
        self.optimizer_b.load_state_dict(state["optimizer_b"])
        self.weights_a.load_state_dict(state["weights_a"])
        self.weights_b.load_state_dict(state["weights_b"])


def crest_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: CReSTState, x_labeled: Tensor,
               y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: CReSTConfig) -> dict[str, float]:
    """One CReST iteration: both forwards on [x_l; x_u], the weights' update, the loss above, backward,
    both optimisers step.

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
    weight_a = state.weights_a.update(out_a[n:])
    weight_b = state.weights_b.update(out_b[n:])
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
