"""Class-rebalancing self-training (CReST; Wei et al., CVPR 2021) as DHC's ``code/train_crest.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps_pair.vnet_pair`) in
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

import numpy as np
import torch
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule
from skcdf.methods.cps_pair import (PAIR_LOSS_TERMS, PairLosses, PairState, RunningClassWeights, cps_pair_step,
                                    pair_recipe, running_class_weights, weighted_pair_losses)

#: Loss terms returned by :func:`crest_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS


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


@dataclass
class CReSTConfig(WeightSchedule):
    """Hyper-parameters of ``train_crest.py`` (README command ``-w 0.1 -ep 300 -r``; momentum fixed)."""

    momentum: float = 0.99


class CReSTWeights(RunningClassWeights):
    """One network's running class weights (DHC's ``CReST`` object): the rates of the labeled counts, then
    an EMA towards the rates of its argmax counts on the unlabeled batch."""

    def __init__(self, labeled_counts: np.ndarray, momentum: float = 0.99, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        start = crest_rates(np.asarray(labeled_counts, dtype=np.float64))
        super().__init__(torch.as_tensor(start, dtype=dtype, device=device), momentum)

    def target(self, counts: np.ndarray) -> Tensor:
        return torch.as_tensor(crest_rates(counts), dtype=self.weights.dtype, device=self.weights.device)


@dataclass
class CReSTState(PairState):
    """Network B, its optimiser, and both networks' class weights."""

    weights_a: CReSTWeights
    weights_b: CReSTWeights


def crest_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: CReSTState, x_labeled: Tensor,
               y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: CReSTConfig) -> dict[str, float]:
    """One CReST iteration: both forwards on [x_l; x_u], the weights' update, the loss above, backward,
    both optimisers step.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B and the weights). Returns ``LOSS_TERMS``
    as floats.
    """
    n = x_labeled.shape[0]

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        weight_a = state.weights_a.update(out_a[n:])
        weight_b = state.weights_b.update(out_b[n:])
        return weighted_pair_losses(out_a, out_b, y_labeled, weight_a, weight_b)

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


RECIPE = pair_recipe(CReSTState, CReSTConfig, crest_step, running_class_weights(CReSTWeights))
