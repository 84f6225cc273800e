"""What a configuration trains: its network, the module the step calls, and the optimiser of a network.

The trainer (:mod:`skcdf.train.trainer`) builds these once in its set-up; a resume rebuilds them the same way
before it loads last.pt. An SKCDF variant trains an :class:`~skcdf.nn.SKCDFNet` through both flows at once
(:class:`~skcdf.train.step.TwoFlowForward`, under DDP and ``torch.compile`` where configured); a Table 1
method trains its :class:`~skcdf.methods.plugin.MethodNet`, whose own step calls its networks.
"""

from __future__ import annotations

import torch
from torch import nn

from skcdf.methods.plugin import MethodNet
from skcdf.nn import SKCDFNet
from skcdf.train.config import Config
from skcdf.train.processes import Processes
from skcdf.train.step import TwoFlowForward


def build_model(config: Config, num_classes: int, procs: Processes, device: torch.device,
                channels_last: bool) -> nn.Module:
    """The configured network on ``device`` (one input channel), initialised from the global RNG."""
    method = config.method
    if method.plugin:
        model: nn.Module = MethodNet(method.name, 1, num_classes, config.filters, config.dropout)
    else:
        model = SKCDFNet(in_channels=1, num_classes=num_classes, filters=config.filters,
                         patch_size=config.patch_size, num_heads=config.num_heads, skcm=config.skcm,
                         shared_decoder=config.shared_decoder, aux_heads=config.aux_heads, dropout=config.dropout)
        for decoder in {model.labeled_decoder, model.unlabeled_decoder}:
            decoder.detach_aux = config.balance_mode == "decoupled"  # the balanced loss trains the head alone
    if procs.world > 1 and config.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return model


def step_module(model: nn.Module, config: Config, procs: Processes, device: torch.device) -> nn.Module:
    """The module the step calls: both flows in one call (semi), under DDP and torch.compile if configured.
    A Table 1 method's step calls its networks itself (MethodTraining averages their gradients)."""
    if config.method.plugin:
        return model
    semi = config.method.semi
    module: nn.Module = TwoFlowForward(model) if semi else model
    if procs.world > 1:
        module = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None,
            # a supervised method with two decoders never touches D_l
            find_unused_parameters=not semi and not config.shared_decoder)
    if config.compile:
        module = torch.compile(module)
    return module


def new_optimizer(config: Config, network: nn.Module) -> torch.optim.Optimizer:
    """SGD over ``network``'s parameters with the configured lr, momentum, Nesterov and weight decay.

    Fused (one kernel for all parameter tensors; the same update as the loop up to float rounding, not bit for
    bit) except for the Table 1 steps: some leave parameters without a gradient in an iteration (SS-Net's
    selectors of a class absent from the batch), which the fused kernel refuses.
    """
    return torch.optim.SGD(network.parameters(), lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay, fused=not config.method.plugin)
