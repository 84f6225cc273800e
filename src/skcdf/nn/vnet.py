"""The VNet encoder and decoder of SKCDF (SPEC §1.1–1.2).

Shapes below use ``nf`` base filters and an input patch ``(D, H, W)`` divisible by 16; the encoder's
five stage features are ``x1 … x5`` with ``nf·2^(i-1)`` channels at ``(D, H, W) / 2^(i-1)``.
"""

from __future__ import annotations

import torch
from torch import nn

from skcdf.device import fp32_where_cpu_bf16_fails

#: Conv layers per encoder stage and per decoder stage (SPEC §1.1, §1.2).
ENCODER_DEPTHS = (1, 2, 3, 3, 3)
DECODER_DEPTHS = (3, 3, 2, 1)


class ConvStack(nn.Sequential):
    """``depth`` × (Conv3d 3×3×3, padding 1 → BatchNorm3d → ReLU). Keeps the spatial size."""

    def __init__(self, depth: int, in_channels: int, out_channels: int) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1),
                nn.BatchNorm3d(out_channels),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp32_where_cpu_bf16_fails(super().forward, x)


class Resample(nn.Sequential):
    """Halve (``up=False``: Conv3d k2 s2) or double (``up=True``: ConvTranspose3d k2 s2) the spatial
    size, then BatchNorm3d → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, up: bool) -> None:
        conv = nn.ConvTranspose3d if up else nn.Conv3d
        super().__init__(
            conv(in_channels, out_channels, 2, stride=2),
            nn.BatchNorm3d(out_channels),
            nn.ReLU(inplace=True),
        )


class Encoder(nn.Module):
    """VNet encoder with four downsamplings.

    ``forward(x)``: ``x`` (b, in_channels, D, H, W) → ``[x1, …, x5]``, ``x_i`` of shape
    (b, nf·2^(i-1), D/2^(i-1), H/2^(i-1), W/2^(i-1)). Dropout3d(0.5) acts on ``x5`` in training
    when ``dropout`` is on.
    """

    def __init__(self, in_channels: int, filters: int, *, dropout: bool) -> None:
        super().__init__()
        widths = [filters * 2**i for i in range(5)]
        self.stages = nn.ModuleList(
            ConvStack(depth, in_channels if i == 0 else widths[i], widths[i])
            for i, depth in enumerate(ENCODER_DEPTHS)
        )
        self.downs = nn.ModuleList(Resample(widths[i], widths[i + 1], up=False) for i in range(4))
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x if i == 0 else self.downs[i - 1](x))
            features.append(x)
        features[-1] = self.dropout(features[-1])
        return features


class Decoder(nn.Module):
    """VNet decoder with additive skips and two 1×1×1 heads on the last feature map.

    ``forward(features)``: the encoder's ``[x1, …, x5]`` (``x5`` possibly replaced by the SKCM output)
    → ``(main, aux)`` logits, each (b, num_classes, D, H, W); ``aux`` is None without an aux head.

    ``detach_aux``: the aux head reads a detached copy of the feature map, so a loss on its output
    trains the head alone and never the shared decoder and encoder (classifier re-balancing, set by
    the trainer for ``balance_mode: decoupled``). The outputs are the same either way.
    """

    detach_aux: bool = False

    def __init__(self, filters: int, num_classes: int, *, aux_head: bool, dropout: bool) -> None:
        super().__init__()
        widths = [filters * 2**i for i in range(5)]  # x1 … x5 channels
        self.ups = nn.ModuleList(Resample(widths[4 - i], widths[3 - i], up=True) for i in range(4))
        self.stages = nn.ModuleList(
            ConvStack(depth, widths[3 - i], widths[3 - i]) for i, depth in enumerate(DECODER_DEPTHS)
        )
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.main_head = nn.Conv3d(filters, num_classes, 1)
        self.aux_head = nn.Conv3d(filters, num_classes, 1) if aux_head else None

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = features[4]
        for i, (up, stage) in enumerate(zip(self.ups, self.stages)):
            x = stage(up(x) + features[3 - i])
        x = self.dropout(x)
        aux = None if self.aux_head is None else self.aux_head(x.detach() if self.detach_aux else x)
        return self.main_head(x), aux
