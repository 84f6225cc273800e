"""Uncertainty-aware mean teacher (UA-MT; Yu et al., MICCAI 2019) as DHC's ``code/train_uamt.py`` trains it.

A student VNet learns from the labels and from an EMA teacher on the unlabeled batch, where the teacher
is certain enough:

    loss = ½ (CE(S(x_l), y) − Dice(softmax S(x_l), y)) + w · Σ m · (softmax S(x_u) − softmax T(x_u + ε))² / (2 Σ m + 1e-16)

with ε = clamp(0.1 · N(0, 1), ±0.2); m = [U < (0.75 + 0.25 · ramp(epoch)) · ln 2], U the entropy of the
mean teacher softmax over 8 noisy passes (4 forwards of [x_u; x_u] + ε); after the SGD step the
teacher's parameters move towards the student's: θ_T ← α θ_T + (1 − α) θ_S, α = min(1 − 1/(epoch + 1), 0.99).

As in DHC, the teacher is never put in eval mode: its dropout is on and its BatchNorm layers use batch
statistics and update their own running statistics (which the EMA never touches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import DHCVNet, WeightSchedule, sigmoid_rampup, soft_dice_per_class
from skcdf.methods.plugin import Context, Recipe

#: Loss terms returned by :func:`uamt_step`, the first four in DHC's names.
LOSS_TERMS = ("loss_ce", "loss_dice", "supervised_loss", "consistency_loss", "consistency_weight",
              "certain_voxels", "total")


@dataclass
class UAMTConfig(WeightSchedule):
    """Hyper-parameters of DHC's ``train_uamt.py`` (values: DHC's README command, ``-w 0.1 -ep 300 -r``).

    The weight and its ramp: :class:`~skcdf.methods.common.WeightSchedule`'s.
    ema_decay: the EMA's α cap; passes: T, teacher predictions averaged for the uncertainty (even);
    noise_std, noise_clip: the Gaussian input noise; threshold_classes: the class count whose maximum
    entropy (ln of it) scales the threshold — DHC keeps 2 from the binary original.
    """

    ema_decay: float = 0.99
    passes: int = 8
    noise_std: float = 0.1
    noise_clip: float = 0.2
    threshold_classes: int = 2

    def threshold_at(self, epoch: int) -> float:
        """The uncertainty threshold during ``epoch``: (0.75 + 0.25 · ramp(epoch, max_epoch)) · ln 2."""
        return (0.75 + 0.25 * sigmoid_rampup(epoch, self.max_epoch)) * math.log(self.threshold_classes)

    def ema_alpha_at(self, epoch: int) -> float:
        """The EMA's α: min(1 − 1/(epoch + 1), ema_decay). DHC passes the epoch as the "global step"."""
        return min(1 - 1 / (epoch + 1), self.ema_decay)


@dataclass
class UAMTState:
    """The EMA teacher (same layout as the student; its parameters need no gradient)."""

    teacher: nn.Module

    def __post_init__(self) -> None:
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])


def _noisy(x: Tensor, noise: Callable[[Tensor], Tensor], config: UAMTConfig) -> Tensor:
    return x + torch.clamp(noise(x) * config.noise_std, -config.noise_clip, config.noise_clip)


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, alpha: float) -> None:
    """θ_T ← α θ_T + (1 − α) θ_S over ``parameters()`` (paired in order); buffers are left alone."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s, alpha=1 - alpha)


def uamt_step(student: nn.Module, optimizer: torch.optim.Optimizer, state: UAMTState, x_labeled: Tensor,
              y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: UAMTConfig,
              noise: Callable[[Tensor], Tensor] = torch.randn_like) -> dict[str, float]:
    """One UA-MT iteration: student forward, teacher forwards, the loss above, SGD step, EMA update.

    Args:
        student, optimizer: the student and its optimiser; the teacher is ``state.teacher``.
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch (sets the weight, the threshold and the EMA's α).
        noise: draws standard normal noise shaped like its argument; called once for the teacher's target
            pass ((b_u, C, D, H, W)), then once per pair of uncertainty passes ((2 b_u, C, D, H, W)).
    Returns:
        ``LOSS_TERMS`` as floats (``loss_dice`` is −Dice, ``certain_voxels`` = Σ m).
    """
    teacher = state.teacher
    student.train()
    optimizer.zero_grad()
    n, n_u = x_labeled.shape[0], x_unlabeled.shape[0]
    teacher_input = _noisy(x_unlabeled, noise, config)
    outputs = student(torch.cat([x_labeled, x_unlabeled], dim=0))  # (b_l + b_u, K, D, H, W)
    probs = outputs.softmax(1)
    with torch.no_grad():
        teacher_out = teacher(teacher_input)  # (b_u, K, D, H, W)
        repeated = x_unlabeled.repeat(2, 1, 1, 1, 1)
        passes = [teacher(_noisy(repeated, noise, config)) for _ in range(config.passes // 2)]
        mean_probs = torch.cat(passes).softmax(1).reshape(config.passes, n_u, *outputs.shape[1:]).mean(0)
        uncertainty = -torch.sum(mean_probs * torch.log(mean_probs + 1e-6), dim=1, keepdim=True)  # (b_u, 1, ...)

    loss_ce = F.cross_entropy(outputs[:n], y_labeled)
    loss_dice = -soft_dice_per_class(probs[:n], y_labeled, smooth=1e-8)[1:].mean()
    supervised = 0.5 * (loss_dice + loss_ce)
    distance = (outputs[n:].softmax(1) - teacher_out.softmax(1)) ** 2  # (b_u, K, D, H, W)
    mask = (uncertainty < config.threshold_at(epoch)).to(distance.dtype)
    consistency = torch.sum(mask * distance) / (2 * torch.sum(mask) + 1e-16)
    weight = config.weight_at(epoch)
    loss = supervised + weight * consistency
    loss.backward()
    optimizer.step()
    update_teacher(student, teacher, config.ema_alpha_at(epoch))
    values = (loss_ce, loss_dice, supervised, consistency, weight, mask.sum(), loss)
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    # DHC builds the teacher as a second, separately initialised VNet (PyTorch's default init for both)
    return {name: DHCVNet(in_channels, num_classes, filters, dropout=dropout) for name in ("student", "teacher")}


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[UAMTState, UAMTConfig]:
    config = UAMTConfig.for_context(context)
    return UAMTState(networks["teacher"]), config


# test time: the student (DHC's test.py loads the trained model)
RECIPE = Recipe(_networks, inference=("student",), start=_start, step=uamt_step,
                terms=LOSS_TERMS, supervised="supervised_loss", unsupervised="consistency_loss",
                weight="consistency_weight", trained="student")
