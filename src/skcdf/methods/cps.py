"""Cross pseudo supervision (CPS; Chen et al., CVPR 2021) as DHC's ``code/train_cps.py`` trains it.

Two VNets of the same layout (DHC initialises A kaiming-normal, B xavier-normal: :func:`~skcdf.methods.cps_pair.vnet_pair`)
each learn from the labels and from the other's hard pseudo-labels on the whole batch:

    loss = DiceCE(A(x_l), y) + DiceCE(B(x_l), y) + w · [CE(A(x), argmax B(x)) + CE(B(x), argmax A(x))]

with x = [x_l; x_u], DiceCE = CE − soft Dice (DHC's convention, :func:`~skcdf.methods.common.dice_ce`),
and w = ``CPSConfig.weight_at(epoch)``. Both networks take one SGD step on the summed loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule
from skcdf.methods.cps_pair import (PAIR_LOSS_TERMS, PairState, cps_pair_step, pair_recipe,
                                    weighted_pair_losses)

#: Loss terms returned by :func:`cps_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS


@dataclass
class CPSConfig(WeightSchedule):
    """Hyper-parameters of DHC's ``train_cps.py`` (values: DHC's README command, ``-w 0.1 -ep 300 -r``):
    those of :class:`~skcdf.methods.common.WeightSchedule`."""


@dataclass
class CPSState(PairState):
    """What CPS trains besides the first network: the second network and its optimiser."""


def cps_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: CPSState, x_labeled: Tensor,
             y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: CPSConfig) -> dict[str, float]:
    """One CPS iteration: both forwards on [x_l; x_u], the loss above, backward, one step of each optimiser.

    Args:
        net_a, optimizer_a: network A and its optimiser (B and its optimiser are in ``state``).
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch the iteration belongs to (sets the weight).
    Returns:
        ``LOSS_TERMS`` as Python floats: the four terms, their sums ``sup`` and ``cps``, the weight, ``total``.

    Both networks are put in training mode. DHC splits the concatenated batch in halves; here the split is
    at b_l, which is the same for DHC's equal batch sizes.
    """
    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch),
                         lambda out_a, out_b: weighted_pair_losses(out_a, out_b, y_labeled))


RECIPE = pair_recipe(CPSState, CPSConfig, cps_step)
