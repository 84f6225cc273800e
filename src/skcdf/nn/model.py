"""The full SKCDF network: VNet encoder, SKCM on the bottleneck, labeled and unlabeled decoders."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from skcdf.nn.skcm import SKCM
from skcdf.nn.vnet import Decoder, Encoder

Flow = Literal["labeled", "unlabeled"]

#: The VNet halves the resolution four times.
DOWNSAMPLING = 16


class SKCDFNet(nn.Module):
    """SKCDF network (SPEC §1), with the switches the ablations need (SPEC §3).

    Args:
        in_channels: image channels (1 for CT).
        num_classes: K, classes including background.
        filters: nf, base filters (paper: 32).
        patch_size: (D, H, W) the model is built for (paper: 64×128×128). Each side must be divisible
            by 16; with the SKCM the bottleneck (patch / 16) must also be divisible by ``local_patch``
            and every input must have exactly this size (the global token embedding is tied to it).
        num_heads: N, attention heads of the SKCM's self mode (paper: 2).
        skcm: use the SKCM (off: x5 goes straight to the decoders).
        shared_decoder: one decoder for both flows (the pseudo-labelling baseline).
        aux_heads: add the auxiliary balanced head ``S^a`` to each decoder.
        dropout: Dropout3d(0.5) on x5 and on the decoders' last feature map, and dropout 0.1 in the
            SKCM's attention, all active in training only.
        local_patch: P, the SKCM local block's patch size.

    ``forward(x, flow, n_labeled)`` with ``x`` (b, in_channels, D, H, W) returns ``(main, aux)`` logits,
    each (b, K, D, H, W); ``aux`` is None without auxiliary heads.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, filters: int = 32,
                 patch_size: Sequence[int] = (64, 128, 128), num_heads: int = 2, *,
                 skcm: bool = True, shared_decoder: bool = False, aux_heads: bool = True,
                 dropout: bool = True, local_patch: int = 2) -> None:
        super().__init__()
        patch_size = tuple(int(s) for s in patch_size)
        _check_patch(patch_size, skcm, local_patch)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes),
                            ("filters", filters), ("num_heads", num_heads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.init_args = dict(in_channels=in_channels, num_classes=num_classes, filters=filters,
                              patch_size=list(patch_size), num_heads=num_heads, skcm=skcm,
                              shared_decoder=shared_decoder, aux_heads=aux_heads, dropout=dropout,
                              local_patch=local_patch)
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.encoder = Encoder(in_channels, filters, dropout=dropout)
        bottleneck = tuple(s // DOWNSAMPLING for s in patch_size)
        self.skcm = (SKCM(16 * filters, bottleneck, num_heads, local_patch=local_patch,
                          dropout=0.1 if dropout else 0.0) if skcm else None)
        self.labeled_decoder = Decoder(filters, num_classes, aux_head=aux_heads, dropout=dropout)
        if not shared_decoder:
            # Registered directly: the `unlabeled_decoder` property below falls back to D_l when shared,
            # so a shared decoder appears once in the state dict.
            self._modules["unlabeled_decoder"] = Decoder(filters, num_classes, aux_head=aux_heads, dropout=dropout)
        self._initialise()

    @property
    def unlabeled_decoder(self) -> Decoder:
        """D_u; the labeled decoder itself when the decoder is shared."""
        decoder = self._modules.get("unlabeled_decoder")
        return self.labeled_decoder if decoder is None else decoder

    @property
    def single_path(self) -> bool:
        """Whether both inference paths are one computation (no SKCM, one shared decoder)."""
        return self.skcm is None and self.unlabeled_decoder is self.labeled_decoder

    def _initialise(self) -> None:
        # ref: Conv3d xavier-normal, BN 1/0, SKCM Linear xavier-uniform; the rest keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.xavier_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm3d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5:
            raise ValueError(f"expected input (b, C, D, H, W), got shape {tuple(x.shape)}")
        if self.skcm is not None and tuple(x.shape[2:]) != self.patch_size:
            raise ValueError(f"this model was built for patch {self.patch_size}, got input {tuple(x.shape[2:])}")
        if any(s % DOWNSAMPLING for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not divisible by {DOWNSAMPLING}")

    def forward(self, x: torch.Tensor, flow: Flow = "unlabeled",
                n_labeled: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run one flow.

        Args:
            x: (b, in_channels, D, H, W).
            flow: ``"labeled"`` — SKCM in cross mode on ``[X_L; X_U]`` then D_l; ``"unlabeled"`` —
                SKCM in self mode then D_u (also the inference path).
            n_labeled: labeled flow only: how many leading samples are labeled (default b // 2).

        Returns:
            (main, aux) logits, each (b, K, D, H, W); aux is None without auxiliary heads.
        """
        self._check_input(x)
        features = self.encoder(x)
        if flow == "labeled":
            if self.skcm is not None:
                features[4] = self.skcm(features[4], "cross", x.shape[0] // 2 if n_labeled is None else n_labeled)
            return self.labeled_decoder(features)
        if flow == "unlabeled":
            if self.skcm is not None:
                features[4] = self.skcm(features[4], "self")
            return self.unlabeled_decoder(features)
        raise ValueError(f"flow must be 'labeled' or 'unlabeled', got {flow!r}")

    def forward_labeled_decoder(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference with the labeled decoder (paper Table 4): the SKCM in cross mode with each sample
        paired with itself, then D_l. x (b, in_channels, D, H, W) → (main, aux), each (b, K, D, H, W)."""
        self._check_input(x)
        features = self.encoder(x)
        if self.skcm is not None:
            features[4] = self.skcm(features[4], "paired")
        return self.labeled_decoder(features)


def _check_patch(patch_size: tuple[int, ...], skcm: bool, local_patch: int) -> None:
    """Raise a ValueError naming the rule a patch size breaks."""
    if len(patch_size) != 3 or any(s < 1 for s in patch_size):
        raise ValueError(f"patch_size must be three positive sizes (D, H, W), got {patch_size}")
    if any(s % DOWNSAMPLING for s in patch_size):
        raise ValueError(f"patch_size {patch_size}: every side must be divisible by {DOWNSAMPLING} "
                         "(the VNet downsamples four times)")
    if skcm and any((s // DOWNSAMPLING) % local_patch for s in patch_size):
        raise ValueError(f"patch_size {patch_size}: with the SKCM every side must be divisible by "
                         f"{DOWNSAMPLING * local_patch} (bottleneck {tuple(s // DOWNSAMPLING for s in patch_size)} "
                         f"must be divisible by the local patch size {local_patch})")
