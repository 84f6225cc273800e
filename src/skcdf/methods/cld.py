"""Calibrating label distribution (CLD; Lin et al., MICCAI 2022) as DHC's ``code/train_cld.py`` trains it.

A CPS pair of plain VNets (A kaiming-, B xavier-initialised: :func:`~skcdf.methods.cps_pair.vnet_pair`) with

* fixed class weights from the labeled set, w_c = (max N / N_c)^(1/3) (float32, as DHC), on the supervised
  CE and Dice and on the pseudo-label CE;
* per network a :class:`ConfidenceBank`: the mean softmax of the true class on the labeled batch, per class,
  accumulated over ``update_iter`` batches and then taken (first time) or followed with EMA 0.999;
* sampling rates r = ((1 − conf) / (max(1 − conf) + 1e-12))^0.5, and a 0/1 map that keeps each voxel of the
  *whole* batch with the rate of the network's own predicted class.

With x = [x_l; x_u], o_A, o_B over x, S_A the map from A's prediction and A's rates (same for B):

    loss = DiceCE_w(o_A(x_l), y) + DiceCE_w(o_B(x_l), y)
           + λ(epoch)·[mean(w[ŷ_B]·CE(o_A, ŷ_B)·S_A) + mean(w[ŷ_A]·CE(o_B, ŷ_A)·S_B)],  ŷ = argmax

The pseudo-label CE's class weight is not normalised, and the mean runs over all voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import WeightSchedule, dice_ce, masked_cross_entropy
from skcdf.methods.cps_pair import PAIR_LOSS_TERMS, PairLosses, PairState, cps_pair_step, pair_recipe
from skcdf.methods.plugin import Context

#: Loss terms returned by :func:`cld_step`, in DHC's names.
LOSS_TERMS = PAIR_LOSS_TERMS + ("map_A", "map_B")


def cld_class_weights(labeled_counts: np.ndarray) -> np.ndarray:
    """DHC's ``Synapse_AMOS_cld.weight``: (max N / N)^(1/3) per class, computed in float32 (K,).
    A class absent from the labeled set gets inf, as in DHC."""
    counts = np.asarray(labeled_counts).astype(np.float32)
    return np.power(np.amax(counts) / counts, 1 / 3)


@dataclass
class CLDConfig(WeightSchedule):
    """Hyper-parameters of ``train_cld.py`` (README command ``-w 0.1 -ep 300 -r``; ``--confs_iter`` 8)."""

    update_iter: int = 8
    momentum: float = 0.999
    gamma: float = 0.5


class ConfidenceBank:
    """DHC's ``ConfidenceBank``: per-class confidences (K,) and their running sums."""

    def __init__(self, confs: Tensor, update_iter: int = 8, momentum: float = 0.999) -> None:
        self.confs = confs.clone()  # DHC starts from torch.rand(K); the first update replaces it
        self.update_iter, self.momentum = update_iter, momentum
        self.conf_sum = torch.zeros_like(self.confs)
        self.count = torch.zeros_like(self.confs)
        self.batches = 0  # DHC's tot_iter

    @torch.no_grad()
    def record(self, logits: Tensor, labels: Tensor) -> None:
        """Add a labeled batch (logits (b, K, …), labels (b, …) int64); update every ``update_iter`` batches."""
        scores = F.softmax(logits.detach(), dim=1)
        k = scores.shape[1]
        flat = labels.reshape(-1)
        true_prob = scores.gather(1, labels.unsqueeze(1)).reshape(-1)
        self.conf_sum = self.conf_sum + torch.zeros(k, dtype=scores.dtype, device=scores.device).index_add(0, flat, true_prob)
        self.count = self.count + torch.bincount(flat, minlength=k).to(scores.dtype)
        self.batches += 1
        if self.batches % self.update_iter == 0:
            new = self.conf_sum / (self.count + 1e-12)
            if self.batches <= self.update_iter:
                self.confs = new
            else:
                self.confs = self.confs * self.momentum + new * (1 - self.momentum)
            self.conf_sum = torch.zeros_like(self.confs)
            self.count = torch.zeros_like(self.confs)

    def sampling_rates(self, gamma: float = 0.5) -> Tensor:
        """DHC's ``cal_sampling_rate``: ((1 − conf) / (max(1 − conf) + 1e-12))^γ, (K,)."""
        rate = 1 - self.confs
        return (rate / (torch.max(rate) + 1e-12)) ** gamma

    def state_dict(self) -> dict[str, Any]:
        return {"confs": self.confs.clone(), "conf_sum": self.conf_sum.clone(), "count": self.count.clone(),
                "batches": self.batches, "update_iter": self.update_iter, "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.confs, self.conf_sum, self.count = (state[k].clone() for k in ("confs", "conf_sum", "count"))
        self.batches, self.update_iter = int(state["batches"]), int(state["update_iter"])
        self.momentum = float(state["momentum"])


def sampling_map(logits: Tensor, rates: Tensor, uniform: Tensor | None = None) -> Tensor:
    """DHC's ``cal_sampling_mask`` (CLD): 1 where u > 1 − rate[argmax logits], per voxel (b, …).

    ``uniform`` (b, …) in [0, 1): one draw per voxel (DHC draws one field per class and uses the field of the
    voxel's predicted class: the same distribution); drawn here when None."""
    predicted = logits.detach().argmax(1)
    if uniform is None:
        uniform = torch.rand(predicted.shape, dtype=logits.dtype, device=logits.device)
    return (uniform.to(logits.dtype) > (1 - rates.to(logits.dtype))[predicted]).to(logits.dtype)


@dataclass
class CLDState(PairState):
    """Network B, its optimiser, the class weights and both networks' confidence banks."""

    class_weight: Tensor
    bank_a: ConfidenceBank
    bank_b: ConfidenceBank


def cld_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: CLDState, x_labeled: Tensor,
             y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: CLDConfig,
             uniforms: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """One CLD iteration: both forwards on [x_l; x_u], the banks' records, the maps, the loss above, backward,
    both optimisers step.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B, the weights and the banks);
    ``uniforms``: (A's, B's) per-voxel draws (b_l + b_u, D, H, W) for the maps, or None to draw them.
    Returns ``LOSS_TERMS`` as floats (``map_A``/``map_B``: the voxels each map keeps).
    """
    n = x_labeled.shape[0]
    uniform_a, uniform_b = (None, None) if uniforms is None else uniforms

    def losses(out_a: Tensor, out_b: Tensor) -> PairLosses:
        state.bank_a.record(out_a[:n], y_labeled)
        state.bank_b.record(out_b[:n], y_labeled)
        weight_c = state.class_weight
        map_a = sampling_map(out_a, state.bank_a.sampling_rates(config.gamma), uniform_a)
        map_b = sampling_map(out_b, state.bank_b.sampling_rates(config.gamma), uniform_b)
        return PairLosses(dice_ce(out_a[:n], y_labeled, weight_c), dice_ce(out_b[:n], y_labeled, weight_c),
                          masked_cross_entropy(out_a, out_b.detach().argmax(1), map_a, weight_c),
                          masked_cross_entropy(out_b, out_a.detach().argmax(1), map_b, weight_c),
                          {"map_A": float(map_a.sum()), "map_B": float(map_b.sum())})

    return cps_pair_step(net_a, optimizer_a, state, x_labeled, x_unlabeled, config.weight_at(epoch), losses)


def _statistics(config: CLDConfig, context: Context) -> tuple[Tensor, ConfidenceBank, ConfidenceBank]:
    weight = torch.as_tensor(cld_class_weights(context.labeled_class_counts.cpu().numpy()), device=context.device)
    # DHC starts each bank from torch.rand(K); its first update replaces them
    banks = tuple(ConfidenceBank(torch.rand(context.num_classes, device=context.device), config.update_iter,
                                 config.momentum) for _ in range(2))
    return (weight, *banks)


RECIPE = pair_recipe(CLDState, CLDConfig, cld_step, _statistics, LOSS_TERMS)
