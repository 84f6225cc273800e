"""The CPS-pair skeleton that CPS, DePL, Adsh, CReST, SimiS, DHC and CLD share (DHC's ``train_*.py``).

Two networks A and B see the whole batch x = [x_l; x_u]; each is supervised on the labeled part and taught
by the other's pseudo-labels, and both take one SGD step on

    loss = sup_A + sup_B + λ(epoch) · (cps_A + cps_B)

Only how the four terms are computed from the two outputs differs between the methods: each passes a
:data:`PairLossFn` to :func:`cps_pair_step`. Also shared: the state holding B, its optimiser and the
method's statistics (:class:`PairState`), the running class weights of CReST and SimiS
(:class:`RunningClassWeights`); each method's configuration extends
:class:`~skcdf.methods.common.WeightSchedule` (the ramped weight λ).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from skcdf.methods.common import DHCVNet, WeightSchedule, cross_entropy, dice_ce, init_like_dhc
from skcdf.methods.plugin import Context, MethodState, Recipe, Step

#: Loss terms every CPS-pair step returns, in DHC's names (methods may add their own after them).
PAIR_LOSS_TERMS = ("sup_A", "sup_B", "cps_A", "cps_B", "sup", "cps", "cps_w", "total")


@dataclass
class PairState:
    """Network B and its optimiser; subclasses add the method's statistics as further fields.

    :meth:`state_dict` saves every field under its name: a tensor as a clone, anything else through its
    own ``state_dict``; :meth:`load_state_dict` restores them the same way.
    """

    net_b: nn.Module
    optimizer_b: torch.optim.Optimizer

    def state_dict(self) -> dict[str, Any]:
        return {f.name: _save(getattr(self, f.name)) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            current = getattr(self, f.name)
            if isinstance(current, Tensor):
                setattr(self, f.name, state[f.name].clone())
            else:
                current.load_state_dict(state[f.name])


def _save(value: Any) -> Any:
    return value.clone() if isinstance(value, Tensor) else value.state_dict()


class PairLosses(NamedTuple):
    """The four terms of one CPS-pair iteration, and what the method reports besides (added as they are)."""

    sup_a: Tensor
    sup_b: Tensor
    cps_a: Tensor
    cps_b: Tensor
    extras: dict[str, Any] | None = None


#: (logits of A, logits of B), each (b_l + b_u, K, D, H, W), labeled samples first → the four terms.
PairLossFn = Callable[[Tensor, Tensor], PairLosses]


def cps_pair_step(net_a: nn.Module, optimizer_a: torch.optim.Optimizer, state: PairState, x_labeled: Tensor,
                  x_unlabeled: Tensor, weight: float, losses: PairLossFn) -> dict[str, Any]:
    """One CPS-pair iteration: both forwards on [x_l; x_u], ``losses``, backward, one step of each optimiser.

    Args:
        net_a, optimizer_a: network A and its optimiser (B and its optimiser are in ``state``).
        x_labeled: (b_l, C, D, H, W); x_unlabeled: (b_u, C, D, H, W).
        weight: λ, the weight of the pseudo-supervision terms.
        losses: the method's terms from the two outputs (it closes over the labels and its statistics).
    Returns:
        :data:`PAIR_LOSS_TERMS` as Python floats, then the method's extras.

    Both networks are put in training mode; A runs first (which fixes the order of random draws).
    """
    net_b, optimizer_b = state.net_b, state.optimizer_b
    net_a.train()
    net_b.train()
    optimizer_a.zero_grad()
    optimizer_b.zero_grad()
    x = torch.cat([x_labeled, x_unlabeled], dim=0)
    out_a = net_a(x)
    out_b = net_b(x)
    terms = losses(out_a, out_b)
    sup, cps = terms.sup_a + terms.sup_b, terms.cps_a + terms.cps_b
    loss = sup + weight * cps
    loss.backward()
    optimizer_a.step()
    optimizer_b.step()
    values = (terms.sup_a, terms.sup_b, terms.cps_a, terms.cps_b, sup, cps, weight, loss)
    report: dict[str, Any] = {name: float(v.detach()) if isinstance(v, Tensor) else float(v)
                              for name, v in zip(PAIR_LOSS_TERMS, values)}
    report.update(terms.extras or {})
    return report


def weighted_pair_losses(out_a: Tensor, out_b: Tensor, y_labeled: Tensor, weight_a: Tensor | None = None,
                         weight_b: Tensor | None = None) -> PairLosses:
    """CPS's terms with optional class weights (K,) per network, used in both of its losses:

    sup_A = DiceCE_{w_A}(o_A(x_l), y),  cps_A = CE_{w_A}(o_A, argmax o_B)   (same for B).
    """
    n = y_labeled.shape[0]
    pseudo_a = out_a.detach().argmax(1)
    pseudo_b = out_b.detach().argmax(1)
    return PairLosses(dice_ce(out_a[:n], y_labeled, weight_a), dice_ce(out_b[:n], y_labeled, weight_b),
                      cross_entropy(out_a, pseudo_b, weight_a), cross_entropy(out_b, pseudo_a, weight_b))


def vnet_pair(in_channels: int, num_classes: int, filters: int, dropout: bool,
              init_b: Callable[[Tensor], Any] = nn.init.xavier_normal_) -> dict[str, nn.Module]:
    """DHC's two VNets: A kaiming-normal, B ``init_b`` (xavier-normal in every script but DHC's own)."""
    return {"A": init_like_dhc(DHCVNet(in_channels, num_classes, filters, dropout=dropout)),
            "B": init_like_dhc(DHCVNet(in_channels, num_classes, filters, dropout=dropout), init_b)}


#: ``(method configuration, context) -> the state's fields after B and its optimiser`` (class-weight
#: statistics, banks, ...), fresh for training from scratch.
Statistics = Callable[[Any, Context], tuple[Any, ...]]


def class_counts(labels: Tensor, num_classes: int) -> np.ndarray:
    """Voxel count per class of an integer label map, float64 (K,)."""
    return torch.bincount(labels.reshape(-1).cpu(), minlength=num_classes).numpy().astype(np.float64)


class RunningClassWeights:
    """One network's class weights (K,), moved every iteration by an EMA towards a statistic of its own
    argmax counts (DHC's ``CReST`` and ``SimiS`` objects). A subclass sets the start and :meth:`target`."""

    def __init__(self, weights: Tensor, momentum: float) -> None:
        self.weights, self.momentum = weights, momentum

    def target(self, counts: np.ndarray) -> Tensor:
        """What the weights move towards, from argmax counts (K,) float32; in the weights' dtype."""
        raise NotImplementedError

    def update(self, logits: Tensor) -> Tensor:
        """w ← m·w + (1 − m)·target(argmax counts of ``logits`` (b, K, …)); returns the weights."""
        counts = class_counts(logits.detach().argmax(1), logits.shape[1]).astype(np.float32)
        self.weights = self.momentum * self.weights + (1 - self.momentum) * self.target(counts)
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "momentum": self.momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.momentum = float(state["momentum"])


def running_class_weights(weights_type: Callable[..., RunningClassWeights]) -> Statistics:
    """The fresh statistics of a pair whose networks each keep running class weights:
    ``weights_type(labeled class counts, config.momentum, device=...)`` for A and for B."""

    def statistics(config: Any, context: Context) -> tuple[RunningClassWeights, ...]:
        counts = context.labeled_class_counts.cpu().numpy()
        return tuple(weights_type(counts, config.momentum, device=context.device) for _ in range(2))

    return statistics


def pair_recipe(state_type: type[PairState], config_type: type[WeightSchedule], step: Step,
                statistics: Statistics = lambda config, context: (), terms: tuple[str, ...] = PAIR_LOSS_TERMS,
                init_b: Callable[[Tensor], Any] = nn.init.xavier_normal_) -> Recipe:
    """The :class:`~skcdf.methods.plugin.Recipe` of a CPS-pair method: :func:`vnet_pair`; a fresh state
    ``state_type(B, B's optimiser, *statistics(config, context))`` with the configuration's ramp length;
    A's and B's logits averaged at test time (DHC's ``test.py --cps AB``); DHC's loss names."""

    def start(networks: dict[str, nn.Module], context: Context) -> tuple[MethodState, Any]:
        config = config_type.for_context(context)
        net_b = networks["B"]
        return state_type(net_b, context.new_optimizer(net_b), *statistics(config, context)), config

    return Recipe(networks=functools.partial(vnet_pair, init_b=init_b), inference=("A", "B"), start=start,
                  step=step, terms=terms, supervised="sup", unsupervised="cps", weight="cps_w")


__all__ = ["PAIR_LOSS_TERMS", "PairLossFn", "PairLosses", "PairState", "RunningClassWeights", "class_counts",
           "cps_pair_step", "pair_recipe", "running_class_weights", "vnet_pair", "weighted_pair_losses"]
