"""Uncertainty-rectified pyramid consistency (URPC; Luo et al., MICCAI 2021) as DHC's ``code/train_urpc.py``
trains it.

One network, :class:`UNet3DDeepSupervision` (DHC's ``unet_3D_ds``, *not* the VNet of the other methods),
gives four outputs p_1 … p_4 at full resolution (softmax of the last decoder level and of three coarser
levels, upsampled). With x = [x_l; x_u], p̄ = mean_k p_k and D_k = Σ_c p̄ (log p̄ − log p_k) (per voxel):

    sup  = (Σ_k CE(o_k(x_l), y) + Σ_k −Dice(p_k(x_l), y)) / 8           (Dice: foreground mean, smooth 1e-8)
    cons = mean_k [ mean((p̄ − p_k)² · e^(−D_k)) / (mean e^(−D_k) + 1e-8) + mean D_k ]      (over x_u)
    loss = sup + λ(epoch) · cons

As in DHC's code, p̄ and D_k are not detached; the first mean runs over voxels *and* classes, the second
over voxels only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.device import fp32_where_cpu_bf16_fails
from skcdf.methods.common import ReplayableDropout3d, WeightSchedule, init_like_dhc, soft_dice_per_class
from skcdf.methods.plugin import Context, Recipe

#: Loss terms returned by :func:`urpc_step`, in DHC's names.
LOSS_TERMS = tuple(f"loss_ce_aux{k}" for k in range(1, 5)) + tuple(f"loss_dice_aux{k}" for k in range(1, 5)) + \
    tuple(f"consistency_loss_aux{k}" for k in range(1, 5)) + ("supervised_loss", "consistency_loss", "cps_w", "total")


class _DoubleConv(nn.Module):
    """Two (Conv3d 3×3×3, padding 1 → InstanceNorm3d (no affine) → ReLU); DHC's ``UnetConv3``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, 1, 1), nn.InstanceNorm3d(out_channels),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(nn.Conv3d(out_channels, out_channels, 3, 1, 1), nn.InstanceNorm3d(out_channels),
                                   nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return fp32_where_cpu_bf16_fails(lambda x: self.conv2(self.conv1(x)), x)


class _Up(nn.Module):
    """Trilinear ×2 upsampling of the deeper map, concatenated after the skip, then a :class:`_DoubleConv`."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = _DoubleConv(in_channels + out_channels, out_channels)
        self.up = nn.Upsample(scale_factor=(2, 2, 2), mode="trilinear")

    def forward(self, skip: Tensor, deeper: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(deeper)], 1))


class _Head(nn.Module):
    """1×1×1 Conv3d then trilinear upsampling by ``scale``."""

    def __init__(self, in_channels: int, num_classes: int, scale: int) -> None:
        super().__init__()
        self.dsv = nn.Sequential(nn.Conv3d(in_channels, num_classes, 1), nn.Upsample(scale_factor=scale, mode="trilinear"))

    def forward(self, x: Tensor) -> Tensor:
        return self.dsv(x)


class UNet3DDeepSupervision(nn.Module):
    """DHC's ``unet_3D_ds(feature_scale, n_classes, in_channels)``: a 3D U-Net with InstanceNorm, max-pooling,
    trilinear upsampling and four outputs.

    Widths 64·2^i / ``feature_scale`` (DHC: 4, so 16 … 256). Dropout3d p = 0.5, 0.3, 0.2, 0.1 after the four
    decoder levels (deepest first). ``forward(x)``: x (b, C, D, H, W), sides divisible by 16 → in training
    ``(o_1, o_2, o_3, o_4)`` logits (b, K, D, H, W), finest first; in eval o_1 only. Module names are DHC's,
    so its state dicts load as they are. Parameters are left at PyTorch's defaults (DHC: kaiming-normal).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, feature_scale: int = 4) -> None:
        super().__init__()
        w = [int(x / feature_scale) for x in (64, 128, 256, 512, 1024)]
        self.conv1 = _DoubleConv(in_channels, w[0])
        self.conv2 = _DoubleConv(w[0], w[1])
        self.conv3 = _DoubleConv(w[1], w[2])
        self.conv4 = _DoubleConv(w[2], w[3])
        self.center = _DoubleConv(w[3], w[4])
        self.up_concat4 = _Up(w[4], w[3])
        self.up_concat3 = _Up(w[3], w[2])
        self.up_concat2 = _Up(w[2], w[1])
        self.up_concat1 = _Up(w[1], w[0])
        self.dsv4 = _Head(w[3], num_classes, 8)
        self.dsv3 = _Head(w[2], num_classes, 4)
        self.dsv2 = _Head(w[1], num_classes, 2)
        self.dsv1 = nn.Conv3d(w[0], num_classes, 1)
        self.dropout1, self.dropout2 = ReplayableDropout3d(0.5), ReplayableDropout3d(0.3)
        self.dropout3, self.dropout4 = ReplayableDropout3d(0.2), ReplayableDropout3d(0.1)

    def dropouts(self) -> list[ReplayableDropout3d]:
        """The dropout modules in call order within one forward."""
        return [self.dropout1, self.dropout2, self.dropout3, self.dropout4]

    def replay_dropout(self, masks: Iterable[Tensor]) -> None:
        """Queue masks given in call order over whole forwards (4 per forward)."""
        modules = self.dropouts()
        for i, mask in enumerate(masks):
            modules[i % 4].replay([mask])

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor, Tensor]:
        c1 = self.conv1(x)
        c2 = self.conv2(F.max_pool3d(c1, 2))
        c3 = self.conv3(F.max_pool3d(c2, 2))
        c4 = self.conv4(F.max_pool3d(c3, 2))
        center = self.center(F.max_pool3d(c4, 2))
        up4 = self.dropout1(self.up_concat4(c4, center))
        up3 = self.dropout2(self.up_concat3(c3, up4))
        up2 = self.dropout3(self.up_concat2(c2, up3))
        up1 = self.dropout4(self.up_concat1(c1, up2))
        out1 = self.dsv1(up1)
        if not self.training:
            return out1
        return out1, self.dsv2(up2), self.dsv3(up3), self.dsv4(up4)


@dataclass
class URPCConfig(WeightSchedule):
    """Hyper-parameters of ``train_urpc.py`` (README command ``-w 0.1 -ep 300 -r``): the weight and its ramp."""


@dataclass
class URPCState:
    """URPC trains one network: nothing besides it and its optimiser (kept for the common step signature)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def rectified_consistency(probs: Tensor, mean_probs: Tensor) -> Tensor:
    """One scale's term: mean((p̄ − p)² e^(−D)) / (mean e^(−D) + 1e-8) + mean D, D = KL(p̄ ‖ p) per voxel."""
    divergence = torch.sum(F.kl_div(torch.log(probs), mean_probs, reduction="none"), dim=1, keepdim=True)
    rectifier = torch.exp(-divergence)
    return torch.mean((mean_probs - probs) ** 2 * rectifier) / (torch.mean(rectifier) + 1e-8) + torch.mean(divergence)


def urpc_step(net: nn.Module, optimizer: torch.optim.Optimizer, state: URPCState, x_labeled: Tensor,
              y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: URPCConfig) -> dict[str, float]:
    """One URPC iteration: forward on [x_l; x_u], the loss above, backward, SGD step.

    Args: as :func:`~skcdf.methods.cps.cps_step`, ``net`` a :class:`UNet3DDeepSupervision`. Returns
    ``LOSS_TERMS`` as floats (the Dice terms are −Dice).
    """
    net.train()
    optimizer.zero_grad()
    n = x_labeled.shape[0]
    outputs = net(torch.cat([x_labeled, x_unlabeled], dim=0))
    probs = [o.softmax(1) for o in outputs]
    ce = [F.cross_entropy(o[:n], y_labeled) for o in outputs]
    dice = [-soft_dice_per_class(p[:n], y_labeled, smooth=1e-8)[1:].mean() for p in probs]
    supervised = (sum(ce) + sum(dice)) / 8
    mean_probs = sum(probs) / 4
    consistency_terms = [rectified_consistency(p[n:], mean_probs[n:]) for p in probs]
    consistency = sum(consistency_terms) / 4
    weight = config.weight_at(epoch)
    loss = supervised + weight * consistency
    loss.backward()
    optimizer.step()
    values = (*ce, *dice, *consistency_terms, supervised, consistency, weight, loss)
    return {name: float(v.detach()) if isinstance(v, Tensor) else float(v) for name, v in zip(LOSS_TERMS, values)}


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    # the U-Net's width follows `filters`: DHC's feature_scale 4 (16 base channels) at the VNet's 32
    if 128 % filters:
        raise ValueError(f"URPC's U-Net needs filters dividing 128 (its base width is filters / 2), got {filters}")
    return {"net": init_like_dhc(UNet3DDeepSupervision(in_channels, num_classes, feature_scale=128 // filters))}


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[URPCState, URPCConfig]:
    return URPCState(), URPCConfig.for_context(context)


RECIPE = Recipe(_networks, inference=("net",), start=_start, step=urpc_step,
                terms=LOSS_TERMS, supervised="supervised_loss", unsupervised="consistency_loss", weight="cps_w",
                trained="net")
