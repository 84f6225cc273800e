"""Knowledge transfer between heads and decoders by exponential moving average (SPEC §2).

Applied before each iteration's forward, on parameters only (BN buffers are left alone):
``θ_dst ← ω·θ_dst + (1−ω)·θ_src``. Steps:

- ``Hl``: labeled decoder main head ← labeled decoder auxiliary head
- ``D`` : every parameter of the unlabeled decoder (both heads) ← the same parameter of the labeled decoder
- ``Hu``: unlabeled decoder main head ← unlabeled decoder auxiliary head

The plan pairs the parameter tensors once, so each iteration is two fused in-place ``_foreach``
calls per step (no name look-ups, no state-dict copies).

A head step can carry a *prior shift* (K,) added to the source head's bias as it is blended in:
``b_main ← ω·b_main + (1−ω)·(b_aux + shift)``. A balanced head trained on voxels kept with
probability k_c predicts the class posterior of that re-balanced sample, whose logits exceed the
data's by log k_c (up to a constant); with shift = log k the main head receives the balanced head's
feature weights without its re-balanced prior (logit adjustment, Menon et al., ICLR 2021).
"""

from __future__ import annotations

import torch
from torch import nn

EMA_STEPS = ("Hl", "D", "Hu")


def parse_ema_order(order: str) -> tuple[str, ...]:
    """"Hl,D,Hu" -> ("Hl", "D", "Hu"); "none" or "" -> (). Raises ValueError on an unknown step."""
    if order.strip().lower() in ("", "none"):
        return ()
    steps = tuple(step.strip() for step in order.split(","))
    unknown = [step for step in steps if step not in EMA_STEPS]
    if unknown:
        raise ValueError(f"unknown EMA step(s) {unknown} in {order!r}; steps are {', '.join(EMA_STEPS)} or 'none'")
    return steps


def _paired_parameters(dst: nn.Module, src: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Parameters of ``dst`` and ``src`` matched by name (the two modules have the same structure)."""
    src_params = dict(src.named_parameters())
    names = [name for name, _ in dst.named_parameters()]
    if set(names) != set(src_params):
        raise ValueError("knowledge transfer between modules of different structure")
    dst_params = dict(dst.named_parameters())
    return [dst_params[n] for n in names], [src_params[n] for n in names]


class KnowledgeTransfer:
    """The EMA steps of one configuration, bound to a model's parameter tensors.

    model: an SKCDFNet (needs ``labeled_decoder``/``unlabeled_decoder`` with ``main_head``/``aux_head``).
    order: step names, e.g. ("Hl", "D", "Hu"); omega: ω, the weight kept by the destination.
    """

    def __init__(self, model: nn.Module, order: tuple[str, ...], omega: float = 0.99) -> None:
        self.omega = omega
        self.order = order
        self.plan: list[tuple[list[nn.Parameter], list[nn.Parameter]]] = []
        self.main_bias = {step: model.labeled_decoder.main_head.bias if step == "Hl"
                          else model.unlabeled_decoder.main_head.bias for step in order if step != "D"}
        self.prior_shift: dict[str, torch.Tensor] = {}  # head step -> (K,), see the module docstring
        for step in order:
            if step == "D":
                if model.unlabeled_decoder is model.labeled_decoder:
                    raise ValueError("EMA step 'D' needs two decoders (shared_decoder is on)")
                self.plan.append(_paired_parameters(model.unlabeled_decoder, model.labeled_decoder))
            else:
                decoder = model.labeled_decoder if step == "Hl" else model.unlabeled_decoder
                if decoder.aux_head is None:
                    raise ValueError(f"EMA step {step!r} needs auxiliary heads (aux_heads is off)")
                self.plan.append(_paired_parameters(decoder.main_head, decoder.aux_head))

    def set_prior_shift(self, step: str, shift: torch.Tensor) -> None:
        """Add ``shift`` (K,) to the balanced head's bias whenever head step ``step`` ("Hl"/"Hu") blends it in."""
        if step not in self.main_bias:
            raise ValueError(f"no head step {step!r} in this transfer's order")
        self.prior_shift[step] = shift.to(self.main_bias[step])

    @torch.no_grad()
    def apply(self) -> None:
        """Run every step in order, in place."""
        for step, (dst, src) in zip(self.order, self.plan):
            torch._foreach_mul_(dst, self.omega)
            torch._foreach_add_(dst, src, alpha=1.0 - self.omega)
            if step in self.prior_shift:
                self.main_bias[step].add_(self.prior_shift[step], alpha=1.0 - self.omega)
