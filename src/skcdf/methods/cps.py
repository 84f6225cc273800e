"""Cross pseudo supervision (CPS; Chen et al., CVPR 2021) as DHC's ``code/train_cps.py`` trains it.

Two VNets of the same layout (DHC initialises A kaiming-normal, B xavier-normal: :func:`init_cps_pair`)
each learn from the labels and from the other's hard pseudo-labels on the whole batch:

    loss = DiceCE(A(x_l), y) + DiceCE(B(x_l), y) + w · [CE(A(x), argmax B(x)) + CE(B(x), argmax A(x))]

with x = [x_l; x_u], DiceCE = CE − soft Dice (DHC's convention, :func:`~skcdf.methods.common.dice_ce`),
and w = ``CPSConfig.weight_at(epoch)``. Both networks take one SGD step on the summed loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from skcdf.methods.common import cross_entropy, dice_ce, weight_during_epoch

#: Loss terms returned by :func:`cps_step`, in DHC's names.
LOSS_TERMS = ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "cps_w", "total")


@dataclass
class CPSConfig:
    """Hyper-parameters of DHC's ``train_cps.py`` (values: DHC's README command, ``-w 0.1 -ep 300 -r``).

    cps_weight: ``-w``, the weight of the pseudo-supervision terms after ramp-up.
    max_epoch: ``-ep``; rampup: ``-r``; rampup_length: ``-cr`` (None: max_epoch).
    """

    cps_weight: float = 0.1
    max_epoch: int = 300
    rampup: bool = True
    rampup_length: float | None = None

    def weight_at(self, epoch: int) -> float:
        """The pseudo-supervision weight during ``epoch`` (DHC ramps once per epoch, one epoch late)."""
        return weight_during_epoch(epoch, self.cps_weight, self.max_epoch, self.rampup, self.rampup_length)


@dataclass
class CPSState:
    """What CPS trains besides the first network: the second network and its optimiser."""

    net_b: nn.Module
    optimizer_b: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        return {"net_b": self.net_b.state_dict(), "optimizer_b": self.optimizer_b.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net_b.load_state_dict(state["net_b"])
        self.optimizer_b.load_state_dict(state["optimizer_b"])


def init_cps_pair(net_a: nn.Module, net_b: nn.Module) -> None:
    """DHC's initialisation: Conv3d weights kaiming-normal in A and xavier-normal in B; BatchNorm 1 / 0;
    everything else (conv biases, transposed convolutions) keeps PyTorch's default."""
    for net, init in ((net_a, nn.init.kaiming_normal_), (net_b, nn.init.xavier_normal_)):
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                init(module.weight)
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


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
    net_b, optimizer_b = state.net_b, state.optimizer_b
    net_a.train()
    net_b.train()
    optimizer_a.zero_grad()
    optimizer_b.zero_grad()
    n = x_labeled.shape[0]
    x = torch.cat([x_labeled, x_unlabeled], dim=0)
    out_a = net_a(x)  # (b_l + b_u, K, D, H, W)
    out_b = net_b(x)
    sup_a = dice_ce(out_a[:n], y_labeled)
    sup_b = dice_ce(out_b[:n], y_labeled)
    pseudo_a = out_a.detach().argmax(1)  # (b_l + b_u, D, H, W)
    pseudo_b = out_b.detach().argmax(1)
    cps_a = cross_entropy(out_a, pseudo_b)
    cps_b = cross_entropy(out_b, pseudo_a)
    weight = config.weight_at(epoch)
    sup, cps = sup_a + sup_b, cps_a + cps_b
    loss = sup + weight * cps
    loss.backward()
    optimizer_a.step()
    optimizer_b.step()
    values = (sup_a, sup_b, cps_a, cps_b, sup, cps, weight, loss)
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}
