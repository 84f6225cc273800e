"""Knowledge transfer between heads and decoders by exponential moving average (SPEC §2).

Applied before each iteration's forward, on parameters only (BN buffers are left alone):
``θ_dst ← ω·θ_dst + (1−ω)·θ_src``. Steps:

- ``Hl``: labeled decoder main head ← labeled decoder auxiliary head
- ``D`` : every parameter of the unlabeled decoder (both heads) ← the same parameter of the labeled decoder
- ``Hu``: unlabeled decoder main head ← unlabeled decoder auxiliary head

The plan pairs the parameter tensors once, so each iteration is two fused in-place ``_foreach``
calls per step (no name look-ups, no state-dict copies).
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
        self.plan: list[tuple[list[nn.Parameter], list[nn.Parameter]]] = []
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

    @torch.no_grad()
    def apply(self) -> None:
        """Run every step in order, in place."""
        for dst, src in self.plan:
            torch._foreach_mul_(dst, self.omega)
            torch._foreach_add_(dst, src, alpha=1.0 - self.omega)
