"""Debiased self-training (DST; Chen et al., NeurIPS 2022) as DHC's ``code/train_dst.py`` trains it.

Two :class:`DecoupledVNet` (DHC's ``VNet_Decoupled``: one encoder, three decoders — ``main``, ``pseudo``
and ``worst`` — each with its own head and its own ``Dropout3d``) are co-trained as in CPS, A kaiming-
and B xavier-initialised (:func:`~skcdf.methods.cps_pair.vnet_pair`). With x = [x_l; x_u] and each
network's outputs (m, p, w) = (main, pseudo, worst):

    sup   = DiceCE(m_A(x_l), y) + DiceCE(m_B(x_l), y)
    cps   = mean[CE(m_A, argmax p_B) · 1(max softmax p_B > 0.95)] + (same with A and B swapped)
    worst = WC(m_A, w_A) + WC(m_B, w_B),  WC(m, w) = 2·CE(w(x_l), argmax m(x_l))
                                                     + mean[−log min(1 − softmax w(x_u)[argmax m(x_u)] + 1e-6, 1)]
    loss  = sup + λ(epoch) · (cps + worst)

The worst decoder reads the encoder features x1 … x5 through a gradient reversal layer (identity forward,
−c · gradient backward) whose coefficient warms up with the iteration count i:
c = 2(hi − lo) / (1 + exp(−α·i / N)) − (hi − lo) + lo, α = 1, lo = 0, hi = 0.1, N = 500; i is counted in
:class:`DSTState` and advanced once per step, after the optimiser steps (DHC's ``model.step()``).

As in DHC's code (not the paper), the pseudo decoder gets no gradient at all — its argmax and confidence
are used without a gradient path — so its parameters never change; only its BatchNorm running statistics
move. The mean in ``cps`` is over all voxels, masked ones counting as 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.methods.common import (ReplayableDropout3d, WeightSchedule, dhc_to_skcdf_key, dice_ce, init_like_dhc,
                                  masked_cross_entropy)
from skcdf.methods.plugin import Context, Recipe
from skcdf.nn.vnet import Decoder, Encoder

#: Loss terms returned by :func:`dst_step`, in DHC's names where it has them.
LOSS_TERMS = ("sup_A", "sup_B", "cps_A", "cps_B", "worst_A", "worst_B", "sup", "cps", "worst", "cps_w", "total",
              "grl_coeff", "mask_A", "mask_B")
DECODERS = ("main", "pseudo", "worst")
_DHC_DECODER = {"decoder": "main", "decoder_pseudo": "pseudo", "decoder_worst": "worst"}


class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad.neg() * ctx.coeff, None


def gradient_reverse(x: Tensor, coeff: float) -> Tensor:
    """Identity forward; the backward multiplies the gradient by −``coeff``."""
    return _GradientReverse.apply(x, coeff)


def grl_coefficient(iteration: int, alpha: float = 1.0, lo: float = 0.0, hi: float = 0.1,
                    max_iters: float = 500) -> float:
    """DHC's ``WarmStartGradientReverseLayer`` coefficient after ``iteration`` steps."""
    return float(2.0 * (hi - lo) / (1.0 + math.exp(-alpha * iteration / max_iters)) - (hi - lo) + lo)


class DecoupledVNet(nn.Module):
    """DHC's ``VNet_Decoupled(n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout)``.

    The :class:`~skcdf.nn.vnet.Encoder` with ``Dropout3d(0.5)`` on x5 and three
    :class:`~skcdf.nn.vnet.Decoder` (``decoders["main"|"pseudo"|"worst"]``), each with its own
    ``Dropout3d(0.5)`` on its last feature map and its own head. ``forward(x, grl_coeff)``: x (b, C, D, H, W)
    → in training ``(main, pseudo, worst)`` logits, each (b, K, D, H, W), the worst decoder reading the
    features through :func:`gradient_reverse`; in eval the main logits only (as DHC).
    In training a forward uses four dropout masks, in the order encoder, main, pseudo, worst.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, filters: int = 32, *, dropout: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, filters, dropout=False)
        self.decoders = nn.ModuleDict({name: Decoder(filters, num_classes, aux_head=False, dropout=False)
                                       for name in DECODERS})
        if dropout:
            self.encoder.dropout = ReplayableDropout3d(0.5)
            for decoder in self.decoders.values():
                decoder.dropout = ReplayableDropout3d(0.5)

    def dropouts(self) -> list[nn.Module]:
        """The dropout modules in call order within one forward: encoder, main, pseudo, worst."""
        return [self.encoder.dropout, *(self.decoders[name].dropout for name in DECODERS)]

    def replay_dropout(self, masks: Iterable[Tensor]) -> None:
        """Queue masks given in call order over whole forwards (4 per forward, :meth:`dropouts`' order)."""
        modules = self.dropouts()
        for i, mask in enumerate(masks):
            modules[i % len(modules)].replay([mask])

    def forward(self, x: Tensor, grl_coeff: float = 0.0) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        features = self.encoder(x)
        main, _ = self.decoders["main"](features)
        if not self.training:
            return main
        pseudo, _ = self.decoders["pseudo"](features)
        worst, _ = self.decoders["worst"]([gradient_reverse(f, grl_coeff) for f in features])
        return main, pseudo, worst


def dst_to_skcdf_key(key: str) -> str:
    """Map a DHC ``VNet_Decoupled`` state-dict key to the :class:`DecoupledVNet` key
    (``decoder_worst.head.bias`` → ``decoders.worst.main_head.bias``; encoder keys as a plain VNet's)."""
    prefix, _, rest = key.partition(".")
    if prefix not in _DHC_DECODER:
        return dhc_to_skcdf_key(key)
    rest = "out_conv." + rest[len("head."):] if rest.startswith("head.") else rest
    mapped = dhc_to_skcdf_key(rest)
    assert mapped.startswith("decoder."), key
    return f"decoders.{_DHC_DECODER[prefix]}.{mapped[len('decoder.'):]}"


def from_dhc_dst_state_dict(net: DecoupledVNet, state_dict: Mapping[str, Tensor]) -> DecoupledVNet:
    """Load a DHC ``VNet_Decoupled`` state dict into ``net`` (strict)."""
    net.load_state_dict({dst_to_skcdf_key(k): v for k, v in state_dict.items()}, strict=True)
    return net


@dataclass
class DSTConfig(WeightSchedule):
    """Hyper-parameters of ``train_dst.py`` (README command: ``-w 0.1 -ep 300 -r``, the weight and its ramp
    as :class:`~skcdf.methods.common.WeightSchedule`'s; the GRL's are fixed in ``vnet_dst.py``)."""

    confidence_threshold: float = 0.95
    grl_alpha: float = 1.0
    grl_lo: float = 0.0
    grl_hi: float = 0.1
    grl_max_iters: float = 500

    def grl_coeff(self, iteration: int) -> float:
        return grl_coefficient(iteration, self.grl_alpha, self.grl_lo, self.grl_hi, self.grl_max_iters)


@dataclass
class DSTState:
    """Network B, its optimiser, and the iteration count of both networks' gradient reversal layers."""

    net_b: DecoupledVNet
    optimizer_b: torch.optim.Optimizer
    grl_iterations: int = field(default=0)

    def state_dict(self) -> dict[str, Any]:
        return {"net_b": self.net_b.state_dict(), "optimizer_b": self.optimizer_b.state_dict(),
                "grl_iterations": self.grl_iterations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net_b.load_state_dict(state["net_b"])
        self.optimizer_b.load_state_dict(state["optimizer_b"])
        self.grl_iterations = int(state["grl_iterations"])


def worst_case_loss(main_l: Tensor, worst_l: Tensor, main_u: Tensor, worst_u: Tensor) -> Tensor:
    """DHC's ``WorstCaseEstimationLoss``: 2·CE(worst_l, argmax main_l) + NLL(log(1 − softmax worst_u)).

    The unlabeled term is mean over voxels of −log(min(1 − q + 1e-6, 1)), q the worst head's probability
    of the main head's argmax class. All (b, K, D, H, W); the main outputs only give targets (no gradient).
    """
    target_l = main_l.detach().argmax(1)
    target_u = main_u.detach().argmax(1)
    loss_l = F.cross_entropy(worst_l, target_l)
    log_not = torch.log(torch.clamp(1.0 - F.softmax(worst_u, dim=1) + 1e-6, max=1.0))
    loss_u = F.nll_loss(log_not, target_u)
    return 2 * loss_l + loss_u


def dst_step(net_a: DecoupledVNet, optimizer_a: torch.optim.Optimizer, state: DSTState, x_labeled: Tensor,
             y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: DSTConfig) -> dict[str, float]:
    """One DST iteration: both forwards on [x_l; x_u], the loss above, backward, both optimisers step, the
    GRL iteration count advances by one.

    Args: as :func:`~skcdf.methods.cps.cps_step` (``state`` holds B). Returns ``LOSS_TERMS`` as floats;
    ``mask_A`` / ``mask_B`` count the voxels where A's / B's pseudo head is confident.
    """
    net_b, optimizer_b = state.net_b, state.optimizer_b
    net_a.train()
    net_b.train()
    optimizer_a.zero_grad()
    optimizer_b.zero_grad()
    n = x_labeled.shape[0]
    x = torch.cat([x_labeled, x_unlabeled], dim=0)
    coeff = config.grl_coeff(state.grl_iterations)
    main_a, pseudo_a, worst_a = net_a(x, coeff)
    main_b, pseudo_b, worst_b = net_b(x, coeff)
    sup_a = dice_ce(main_a[:n], y_labeled)
    sup_b = dice_ce(main_b[:n], y_labeled)
    confidence_a, target_a = F.softmax(pseudo_a.detach(), dim=1).max(dim=1)
    confidence_b, target_b = F.softmax(pseudo_b.detach(), dim=1).max(dim=1)
    mask_a = (confidence_a > config.confidence_threshold).to(main_a.dtype)
    mask_b = (confidence_b > config.confidence_threshold).to(main_b.dtype)
    cps_a = masked_cross_entropy(main_a, target_b, mask_b)
    cps_b = masked_cross_entropy(main_b, target_a, mask_a)
    worst_a_loss = worst_case_loss(main_a[:n], worst_a[:n], main_a[n:], worst_a[n:])
    worst_b_loss = worst_case_loss(main_b[:n], worst_b[:n], main_b[n:], worst_b[n:])
    weight = config.weight_at(epoch)
    sup, cps, worst = sup_a + sup_b, cps_a + cps_b, worst_a_loss + worst_b_loss
    loss = sup + weight * (cps + worst)
    loss.backward()
    optimizer_a.step()
    optimizer_b.step()
    state.grl_iterations += 1
    values = (sup_a, sup_b, cps_a, cps_b, worst_a_loss, worst_b_loss, sup, cps, worst, weight, loss, coeff,
              mask_a.sum(), mask_b.sum())
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}


__all__ = ["DecoupledVNet", "DSTConfig", "DSTState", "dst_step", "dst_to_skcdf_key", "from_dhc_dst_state_dict",
           "gradient_reverse", "grl_coefficient", "worst_case_loss"]


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    def network() -> DecoupledVNet:
        return DecoupledVNet(in_channels, num_classes, filters, dropout=dropout)

    return {"A": init_like_dhc(network()), "B": init_like_dhc(network(), nn.init.xavier_normal_)}  # as CPS


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[DSTState, DSTConfig]:
    net_b = networks["B"]
    config = DSTConfig.for_context(context)
    return DSTState(net_b, context.new_optimizer(net_b)), config


# test time: the main decoders of A and B averaged (DHC's test.py --cps AB)
RECIPE = Recipe(_networks, inference=("A", "B"), start=_start, step=dst_step,
                terms=LOSS_TERMS, supervised="sup", unsupervised="cps", weight="cps_w")
