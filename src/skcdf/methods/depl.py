"""Debiased pseudo-labelling (DePL; Wang et al., CVPR 2022) as DHC's ``code/train_depl.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps_pair.vnet_pair`) in
which each network's pseudo-labels are debiased by its own running class marginal q̂ before they teach the
other network. With x = [x_l; x_u], logits o_A, o_B over the whole batch:

    p̃_A = softmax(o_A − τ·log q̂_A);   ŷ_A = argmax p̃_A;   m_A = 1(max p̃_A ≥ 0.9)        (same for B)
    q̂_A ← 0.99·q̂_A + 0.01·mean_batch softmax(o_A(x_u))                                  (after p̃_A)
    loss = DiceCE(o_A(x_l), y) + DiceCE(o_B(x_l), y) + λ(epoch)·[mean(CE(o_A, ŷ_B)·m_B) + mean(CE(o_B, ŷ_A)·m_A)]

with τ = 1. As in DHC's code, q̂ is a per-voxel marginal of shape (1, K, D, H, W) — the patch's — averaged
over the unlabeled batch only, it starts at 1/K and is never reset; the masked means run over all voxels.
DHC's script also computes the paper's adaptive marginal loss (the unlabeled logits shifted by
τ·log q̂ of the other network) but never uses it: the pseudo-label CE is on the raw logits. So is it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule, dice_ce, masked_cross_entropy
from skcdf.methods.cps_pair import PAIR_LOSS_TERMS, PairLosses, PairState, cps_pair_step, pair_recipe
from skcdf.methods.plugin import Context

#: Loss terms returned by :func:`depl_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS + ("mask_A", "mask_B")


@dataclass
class DePLConfig(WeightSchedule):
    """Hyper-parameters of ``train_depl.py`` (README command ``-w 0.1 -ep 300 -r``; τ, the 0.9 threshold and
    the 0.99 momentum are fixed in the script)."""

    tau: float = 1.0
    threshold: float = 0.9
    qhat_momentum: float = 0.99


def initial_qhat(num_classes: int, patch: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """DHC's ``initial_qhat``: 1/K everywhere, (1, K, *patch)."""
    return torch.full((1, num_classes, *patch), 1.0 / num_classes, dtype=dtype, device=device)


@dataclass
class DePLState(PairState):
    """Network B, its optimiser, and both networks' running marginals q̂ (1, K, D, H, W)."""

    qhat_a: Tensor
    qhat_b: Tensor


def debiased_pseudo_labels(logits: Tensor, qhat: Tensor, tau: float, threshold: float) -> tuple[Tensor, Tensor]:
    """(argmax, mask) of softmax(logits − τ·log q̂): (b, …) int64 and (b, …) float, 1 where max ≥ threshold."""
    probs = torch.softmax(logits.detach() - tau * torch.log(qhat), dim=1)
    confidence, target = probs.max(dim=1)
    return target, confidence.ge(threshold).to(logits.dtype)


def update_qhat(qhat: Tensor, logits_unlabeled: Tensor, momentum: float) -> Tensor:
    """m·q̂ + (1 − m)·mean over the batch of softmax(logits): (1, K, …) from (b, K, …)."""
    return momentum * qhat + (1 - momentum) * torch.softmax(logits_unlabeled.detach(), dim=1).mean(dim=0)


def depl_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: DePLState, x_labeled: Tensor,
              y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: DePLConfig) -> dict[str, float]:
    """One DePL iteration: both forwards on [x_l; x_u], the loss above, backward, both optimisers step;
    ``state.qhat_a`` / ``qhat_b`` are replaced by their updates.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B and the marginals, whose spatial shape
    must be the patch's). Returns ``LOSS_TERMS`` as floats; ``mask_A`` / ``mask_B`` count the voxels where
    A's / B's debiased pseudo-label passes the threshold.
    """
    n = x_labeled.shape[0]

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        target_a, mask_a = debiased_pseudo_labels(out_a, state.qhat_a, config.tau, config.threshold)
        target_b, mask_b = debiased_pseudo_labels(out_b, state.qhat_b, config.tau, config.threshold)
        state.qhat_a = update_qhat(state.qhat_a, out_a[n:], config.qhat_momentum)
        state.qhat_b = update_qhat(state.qhat_b, out_b[n:], config.qhat_momentum)
        return PairLosses(dice_ce(out_a[:n], y_labeled), dice_ce(out_b[:n], y_labeled),
                          masked_cross_entropy(out_a, target_b, mask_b), masked_cross_entropy(out_b, target_a, mask_a),
                          {"mask_A": float(mask_a.sum()), "mask_B": float(mask_b.sum())})

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


def _marginals(config: DePLConfig, context: Context) -> tuple[Tensor, Tensor]:
    return tuple(initial_qhat(context.num_classes, context.patch_size, device=context.device) for _ in range(2))


RECIPE = pair_recipe(DePLState, DePLConfig, depl_step, _marginals, LOSS_TERMS)
