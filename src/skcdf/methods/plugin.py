"""How a Table 1 method plugs into skcdf's trainer, checkpoints, ``predict`` and ``export``.

Each of those methods (``cps``, ``uamt``, ``dhc``, …; docs/methods.md) has one module in this package that
ends with a :class:`Recipe`: its networks, how its state starts, its training step, and which networks
predict at test time. Everything else is generic:

* :class:`MethodNet` holds all of a method's networks (both of a pair, a mean teacher) in one module, so
  one ``state_dict`` in the checkpoint restores them; at inference it averages the logits of the
  recipe's ``inference`` networks (DHC's ``test.py``: ``softmax((A(x) + B(x)) / 2)``), and it answers the
  same inference calls as :class:`~skcdf.nn.SKCDFNet` (``model(x, flow=…)``, ``forward_labeled_decoder``),
  so sliding-window inference, ``Segmenter``, validation and ONNX export need no special case.
* :class:`MethodTraining` runs the recipe's step for the trainer: the step does its forwards, backward
  and optimiser steps itself (as DHC's scripts do); the trainer sets the learning rate of every
  optimiser, and checkpoints :meth:`MethodTraining.state_dict` beside the model and the first optimiser.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from skcdf import methods
from skcdf.nn import SKCDFNet


class MethodState(Protocol):
    """What a method keeps between iterations besides its networks' weights (a second optimiser,
    class-weight statistics, banks); restored on resume."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Context:
    """What a method needs to start training, beyond its networks.

    num_classes: K; patch_size: (D, H, W); labeled_class_counts: (K,) voxels per class in the labeled
    cases; unlabeled_cases: how many; batch_unlabeled: per step; iterations_per_epoch; max_epoch: the
    length of DHC's ramp-up (``-ep``), the configuration's ``rampup_epochs``; weight: the unsupervised
    weight after the ramp (``-w``), the configuration's ``method_weight``; new_optimizer: an SGD with the
    run's settings for a further network; device.
    """

    num_classes: int
    patch_size: tuple[int, int, int]
    labeled_class_counts: Tensor
    unlabeled_cases: int
    batch_unlabeled: int
    iterations_per_epoch: int
    max_epoch: int
    weight: float
    new_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    device: torch.device


#: ``step(net, optimizer, state, x_labeled, y_labeled, x_unlabeled, epoch, config) -> {term: float}``
Step = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Recipe:
    """One Table 1 method as the trainer sees it.

    networks: ``(in_channels, num_classes, filters, dropout) -> {name: network}``, initialised as the
        method's DHC script does; every network returns logits (b, K, D, H, W) in eval mode.
    inference: the networks whose logits are averaged at test time.
    start: ``(networks, context) -> (state, method configuration)``: a fresh state for training.
    step: one training iteration (see :data:`Step`).
    terms: the step's loss terms (floats) that metrics.csv records, as ``loss_<term>``.
    supervised, unsupervised, weight: the step's names for the supervised loss, the unsupervised loss
        before weighting, and that weight (metrics.csv's ``loss_sup``, ``loss_unsup`` and ``lambda``).
    trained: the network the trainer's optimiser steps (further ones are stepped through the state).
    """

    networks: Callable[[int, int, int, bool], dict[str, nn.Module]]
    inference: tuple[str, ...]
    start: Callable[[dict[str, nn.Module], Context], tuple[MethodState, Any]]
    step: Step
    terms: tuple[str, ...]
    supervised: str
    unsupervised: str
    weight: str
    trained: str = "A"
    total: str = "total"


def recipe(method: str) -> Recipe:
    """The :class:`Recipe` of the registered plug-in ``method`` (its module is imported on demand, so that
    the registry stays light). KeyError for a name that is not a registered plug-in."""
    entry = methods.method(method)
    if not entry.plugin:
        raise KeyError(f"{method!r} is not a Table 1 method (those: {', '.join(methods.plugin_names())})")
    return importlib.import_module(f"skcdf.methods.{entry.module}").RECIPE


class MethodNet(nn.Module):
    """All networks of one Table 1 method, and its test-time rule.

    ``forward(x, flow=…)`` and ``forward_labeled_decoder(x)``: x (b, in_channels, D, H, W) →
    (logits (b, K, D, H, W), None), the mean of the inference networks' logits (the same on both paths:
    these methods have one). ``init_args`` rebuilds it from a checkpoint (:func:`build_network`).
    """

    skcm = None
    single_path = True  # validation runs it once

    def __init__(self, method: str, in_channels: int = 1, num_classes: int = 14, filters: int = 32,
                 dropout: bool = True) -> None:
        super().__init__()
        self.recipe = recipe(method)
        self.networks = nn.ModuleDict(self.recipe.networks(in_channels, num_classes, filters, dropout))
        self.num_classes = num_classes
        self.init_args = dict(method=method, in_channels=in_channels, num_classes=num_classes, filters=filters,
                              dropout=dropout)

    def logits(self, x: Tensor) -> Tensor:
        outputs = [self.networks[name](x) for name in self.recipe.inference]
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)

    def forward(self, x: Tensor, flow: str = "unlabeled") -> tuple[Tensor, None]:
        return self.logits(x), None

    def forward_labeled_decoder(self, x: Tensor) -> tuple[Tensor, None]:
        return self.logits(x), None


def build_network(model_args: dict[str, Any]) -> nn.Module:
    """The network a checkpoint's ``model_args`` describe: a :class:`MethodNet` or an SKCDFNet."""
    if "method" in model_args:
        return MethodNet(**model_args)
    return SKCDFNet(**model_args)


def _average_gradients(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Before each step under torchrun: every process steps with the mean of all processes' gradients."""
    world = dist.get_world_size()
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad)
                parameter.grad /= world


class MethodTraining:
    """Trains a :class:`MethodNet` with its recipe's step (the trainer's counterpart of the SKCDF step).

    Under torchrun the processes start from rank 0's networks and every optimiser averages the gradients
    across processes before it steps (so the steps need no DistributedDataParallel wrapper); BatchNorm
    statistics and the method's own statistics stay per process (rank 0's are checkpointed).
    """

    def __init__(self, model: MethodNet, optimizer: torch.optim.Optimizer, context: Context) -> None:
        self.recipe, self.model, self.optimizer = model.recipe, model, optimizer
        self.state, self.config = self.recipe.start(dict(model.networks.items()), context)
        self.optimizers = [optimizer] + [value for value in vars(self.state).values()
                                         if isinstance(value, torch.optim.Optimizer)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in model.state_dict().values():  # every process starts from rank 0's networks (as DDP)
                dist.broadcast(tensor, src=0)
            for each in self.optimizers:
                each.register_step_pre_hook(_average_gradients)

    @property
    def trained_network(self) -> nn.Module:
        return self.model.networks[self.recipe.trained]

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr

    def step(self, x_labeled: Tensor, y_labeled: Tensor, x_unlabeled: Tensor, epoch: int) -> dict[str, float]:
        """One iteration. x (b, C, D, H, W), y_labeled (b_l, D, H, W) → the step's loss terms as floats."""
        terms = self.recipe.step(self.trained_network, self.optimizer, self.state, x_labeled, y_labeled,
                                 x_unlabeled, epoch, self.config)
        return {name: float(terms[name]) for name in self.recipe.terms}

    def summary(self, terms: dict[str, float]) -> dict[str, float]:
        """metrics.csv's ``loss``, ``loss_sup``, ``loss_unsup`` and ``lambda`` from an epoch's mean terms."""
        recipe = self.recipe
        return {"loss": terms[recipe.total], "loss_sup": terms[recipe.supervised],
                "loss_unsup": terms[recipe.unsupervised], "lambda": terms[recipe.weight]}

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)
