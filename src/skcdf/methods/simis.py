"""SimiS (Chen et al., 2022) as DHC's ``code/train_simis.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps_pair.vnet_pair`) in
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

import numpy as np
import torch
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule
from skcdf.methods.cps_pair import (PAIR_LOSS_TERMS, PairLosses, PairState, RunningClassWeights, cps_pair_step,
                                    pair_recipe, running_class_weights, weighted_pair_losses)

#: Loss terms returned by :func:`simis_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS


def simis_gaps(counts: np.ndarray) -> np.ndarray:
    """DHC's ``SimiS._weight_wbg``: max P − P per class (K,), in ``counts``' dtype (not yet times K)."""
    share = (counts + 1e-8) / (np.sum(counts) + 1e-8)
    return np.max(share) - share


@dataclass
class SimiSConfig(WeightSchedule):
    """Hyper-parameters of ``train_simis.py`` (README command ``-w 0.1 -ep 300 -r``; momentum fixed)."""

    momentum: float = 0.99


class SimiSWeights(RunningClassWeights):
    """One network's running class weights (DHC's ``SimiS`` object): one EMA step from K towards K·gaps of
    the labeled counts, then an EMA towards K·gaps of its argmax counts on the whole batch."""

    def __init__(self, labeled_counts: np.ndarray, momentum: float = 0.99, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        counts = np.asarray(labeled_counts, dtype=np.float64)
        num_classes = counts.shape[0]
        labeled = torch.as_tensor(simis_gaps(counts) * num_classes, dtype=dtype, device=device)
        start = torch.full((num_classes,), float(num_classes), dtype=dtype, device=device)
        super().__init__(momentum * start + (1 - momentum) * labeled, momentum)

    def target(self, counts: np.ndarray) -> Tensor:
        gaps = torch.as_tensor(simis_gaps(counts), dtype=self.weights.dtype, device=self.weights.device)
        return gaps * self.weights.shape[0]  # times K in the weights' dtype, as DHC


@dataclass
class SimiSState(PairState):
    """Network B, its optimiser, and both networks' class weights."""

    weights_a: SimiSWeights
    weights_b: SimiSWeights


def simis_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: SimiSState, x_labeled: Tensor,
               y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: SimiSConfig) -> dict[str, float]:
    """One SimiS iteration: both forwards on [x_l; x_u], the weights' update from the whole batch, the loss
    above, backward, both optimisers step.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B and the weights). Returns ``LOSS_TERMS``
    as floats.
    """

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        weight_a = state.weights_a.update(out_a)
        weight_b = state.weights_b.update(out_b)
        return weighted_pair_losses(out_a, out_b, y_labeled, weight_a, weight_b)

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


RECIPE = pair_recipe(SimiSState, SimiSConfig, simis_step, running_class_weights(SimiSWeights))
