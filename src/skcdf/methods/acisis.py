"""Basak et al. (MICCAI 2022, "Addressing class imbalance in semi-supervised image segmentation") as DHC's
``code/train_acisis.py`` trains it.

A student VNet and a mean-teacher VNet (both kaiming-initialised, separately; the teacher's parameters follow
the student's by EMA, α = min(1 − 1/(epoch + 1), 0.99), its BatchNorm buffers by its own train-mode forwards):

    o = student([x_l; x_u]);  ŷ = argmax teacher(x_u)                       (teacher: no gradient, dropout on)
    rates.record(o_l, y)                              per-class statistics of the student on the labels
    r = rates.rates()                                 recomputed once per epoch (fuzzy rank fusion, below)
    S(v) = 1(u(v) > 1 − r[argmax o_u(v)]) · (max softmax o_u(v))^1.5,  u ~ U[0, 1) per voxel
    loss = DiceCE(o_l, y) + λ(epoch) · mean_v CE(o_u, ŷ) · S

Class rates (:class:`ClassRates`; DHC's ``ConfidenceArray``): every iteration adds, per class c, three
statistics of the student's softmax s on the labeled batch, each divided by n_c = #{y = c} + 1e-12. As in
DHC's code, the label map of sample i is broadcast against the prediction of every sample j (the sums run
over all pairs (i, j)), and the "entropy" is p_c · Σ_k log(s_k + 1e-12), not −Σ_k s_k log s_k:

    entropy_c    += Σ_{i,j,v} 1(y_i(v) = c) · s_c(j, v) · Σ_k log(s_k(j, v) + 1e-12) / n_c
    confidence_c += Σ_{i,j,v} 1(y_i(v) = c) · s_c(j, v) / n_c
    variance_c   += Σ_{i,j,v} 1(y_i(v) = c) · (max_k s_k(j, v) − s_c(j, v)) / n_c

After ``update_iter`` iterations (DHC: the iterations of one epoch): R = softmax over classes of the three
rows / update_iter (3, K); Gompertz G = 1 − exp(−exp(−2R)); in each row the ``top_m`` = 12 smallest G
keep their value and the others get the penalty 0.632 (K_L), where R is set to 0; FR = Σ_rows K_L,
CFS = 1 − Σ_rows R / 3; CC ← 0.99·CC + 0.01·(CFS·FR / max); r = ((1 − CC) / (max(1 − CC) + 1e-12))^2.5;
the sums are cleared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import DHCVNet, WeightSchedule, dice_ce, init_like_dhc, masked_cross_entropy
from skcdf.methods.uamt import update_teacher
from skcdf.methods.plugin import Context, Recipe

#: Loss terms returned by :func:`acisis_step`, in DHC's names.
LOSS_TERMS = ("sup", "cps", "cps_w", "total", "sample_map_sum")


@dataclass(kw_only=True)
class AcisisConfig(WeightSchedule):
    """Hyper-parameters of ``train_acisis.py``: the weight and its ramp (README command ``-w 0.1 -ep 300 -r``),
    :class:`~skcdf.methods.common.WeightSchedule`'s; the rest is fixed in the script. ``update_iter``:
    iterations between rate updates, DHC's ``len(unlabeled_loader)``."""

    update_iter: int
    ema_decay: float = 0.99
    cc_momentum: float = 0.99
    top_m: int = 12
    p_fr: float = 0.632
    p_ccf: float = 0.0
    lambda_: float = 2.5
    beta: float = 1.5

    def ema_alpha_at(self, epoch: int) -> float:
        """min(1 − 1/(epoch + 1), ema_decay): DHC passes the epoch as the "global step"."""
        return min(1 - 1 / (epoch + 1), self.ema_decay)


class ClassRates:
    """DHC's ``ConfidenceArray``: per-class statistics and sampling rates (all (K,), in ``dtype``)."""

    def __init__(self, num_classes: int, config: AcisisConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.num_classes, self.config = num_classes, config
        zeros = lambda: torch.zeros(num_classes, dtype=dtype, device=device)  # noqa: E731
        self.entropy, self.confidence, self.variance = zeros(), zeros(), zeros()
        self.cc = zeros()
        self.sam_rate = torch.ones(num_classes, dtype=dtype, device=device)
        self.count = 0

    @torch.no_grad()
    def record(self, logits: Tensor, labels: Tensor) -> None:
        """Add one labeled batch: logits (b, K, …), labels (b, …) int64 (see the module docstring)."""
        scores = F.softmax(logits.detach(), dim=1)
        k = self.num_classes
        flat = scores.reshape(scores.shape[0], k, -1)  # (b, K, V)
        onehot = F.one_hot(labels.reshape(labels.shape[0], -1), k).to(flat.dtype)  # (b, V, K)
        label_sum = onehot.sum(0).T  # (K, V): Σ_i 1(y_i = c)
        log_sum = torch.log(flat + 1e-12).sum(1, keepdim=True)  # (b, 1, V)
        prob_sum = flat.sum(0)  # (K, V): Σ_j s_c(j)
        max_sum = flat.max(1).values.sum(0)  # (V,)
        count = onehot.sum((0, 1)) + 1e-12  # (K,)
        self.entropy += (label_sum * (flat * log_sum).sum(0)).sum(1) / count
        self.confidence += (label_sum * prob_sum).sum(1) / count
        self.variance += (label_sum * (max_sum - prob_sum)).sum(1) / count
        self.count += 1

    def rates(self) -> Tensor:
        """DHC's ``cal_sampling_rate``: recompute when ``update_iter`` batches are recorded; the rates (K,)."""
        cfg = self.config
        if self.count != cfg.update_iter:
            return self.sam_rate
        rows = F.softmax(torch.stack([self.entropy, self.confidence, self.variance]) / self.count, dim=1)
        r_norm = rows.cpu().numpy().astype(np.float64)  # (3, K)
        gompertz = np.array([[1 - math.exp(-math.exp(-2.0 * value)) for value in row] for row in r_norm])
        kept = np.full(gompertz.shape, cfg.p_fr)
        for f in range(gompertz.shape[0]):
            cutoff = np.sort(gompertz[f])[cfg.top_m - 1]
            chosen = gompertz[f] <= cutoff  # the top_m smallest values, ties included
            kept[f][chosen] = gompertz[f][chosen]
        fr = kept.sum(0)
        cf = r_norm.copy()
        cf[kept == cfg.p_fr] = cfg.p_ccf
        cfs = 1 - cf.sum(0) / cf.shape[0]
        current = torch.as_tensor(cfs * fr, dtype=self.cc.dtype, device=self.cc.device)
        current = current / current.max()
        self.cc = cfg.cc_momentum * self.cc + (1 - cfg.cc_momentum) * current
        self.entropy, self.confidence, self.variance = (torch.zeros_like(self.cc) for _ in range(3))
        self.count = 0
        rate = 1 - self.cc
        self.sam_rate = torch.pow(rate / (rate.max() + 1e-12), cfg.lambda_)
        return self.sam_rate

    def sampling_map(self, logits: Tensor, uniform: Tensor | None = None) -> Tensor:
        """DHC's ``cal_sampling_mask``: (b, …) weights, 1(u > 1 − rate[argmax]) · (max softmax)^β.

        ``uniform`` (b, …) in [0, 1): one draw per voxel (DHC draws one field per class and uses the field of
        the voxel's predicted class, which is the same distribution); drawn here when None.
        """
        logits = logits.detach()
        predicted = logits.argmax(1)
        top = torch.softmax(logits, dim=1).max(1).values
        if uniform is None:
            uniform = torch.rand(predicted.shape, dtype=logits.dtype, device=logits.device)
        keep = uniform.to(logits.dtype) > (1 - self.sam_rate.to(logits.dtype))[predicted]
        return keep.to(logits.dtype) * torch.pow(top, self.config.beta)

    def state_dict(self) -> dict[str, Any]:
        return {"entropy": self.entropy.clone(), "confidence": self.confidence.clone(),
                "variance": self.variance.clone(), "cc": self.cc.clone(), "sam_rate": self.sam_rate.clone(),
                "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("entropy", "confidence", "variance", "cc", "sam_rate"):
            setattr(self, key, state[key].clone())
        self.count = int(state["count"])
        self.num_classes = self.cc.shape[0]


@dataclass
class AcisisState:
    """The mean teacher (parameters without gradient) and the class rates."""

    teacher: nn.Module
    rates: ClassRates

    def __post_init__(self) -> None:
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict(), "rates": self.rates.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.rates.load_state_dict(state["rates"])


def acisis_step(student: nn.Module, optimizer: torch.optim.Optimizer, state: AcisisState, x_labeled: Tensor,
                y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: AcisisConfig,
                uniform: Tensor | None = None) -> dict[str, float]:
    """One iteration: student forward on [x_l; x_u], teacher forward on x_u, the rates, the loss above,
    SGD step, EMA update of the teacher's parameters.

    Args:
        student, optimizer: the student and its optimiser; the teacher and the rates are in ``state``.
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch (the weight and the EMA's α).
        uniform: (b_u, D, H, W) draws for the sampling map (None: drawn with ``torch.rand``).
    Returns: ``LOSS_TERMS`` as floats (``sample_map_sum``: Σ S).
    """
    teacher = state.teacher
    student.train()
    teacher.train()  # DHC puts both in train mode: the teacher's dropout and batch statistics are on
    optimizer.zero_grad()
    n = x_labeled.shape[0]
    outputs = student(torch.cat([x_labeled, x_unlabeled], dim=0))
    out_l, out_u = outputs[:n], outputs[n:]
    with torch.no_grad():
        pseudo = teacher(x_unlabeled).argmax(1)
    sup = dice_ce(out_l, y_labeled)
    state.rates.record(out_l, y_labeled)
    state.rates.rates()
    sample_map = state.rates.sampling_map(out_u, uniform)
    cps = masked_cross_entropy(out_u, pseudo, sample_map)
    weight = config.weight_at(epoch)
    loss = sup + weight * cps
    loss.backward()
    optimizer.step()
    update_teacher(student, teacher, config.ema_alpha_at(epoch))
    values = (sup, cps, weight, loss, sample_map.sum())
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    # both kaiming-initialised, separately: the teacher is not a copy of the student (as DHC)
    return {name: init_like_dhc(DHCVNet(in_channels, num_classes, filters, dropout=dropout))
            for name in ("student", "teacher")}


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[AcisisState, AcisisConfig]:
    config = AcisisConfig.for_context(context, update_iter=context.iterations_per_epoch)
    return AcisisState(networks["teacher"], ClassRates(context.num_classes, config, device=context.device)), config


RECIPE = Recipe(_networks, inference=("student",), start=_start, step=acisis_step,
                terms=LOSS_TERMS, supervised="sup", unsupervised="cps", weight="cps_w", trained="student")
