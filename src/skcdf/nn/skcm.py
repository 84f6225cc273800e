"""Semantic knowledge complementarity module (SKCM, SPEC §1.3).

Two blocks on the bottleneck feature ``x5`` of shape (b, C, d, h, w): a *local* block, then a
*global* block; the result replaces ``x5``. Attention runs across **channels**: the tokens are the C
channels and their "features" are voxels of a learned re-embedding of each channel.

Internally every block works on grouped tokens of shape (b, G, F, C): G independent attention groups
(the P×P×P patch positions for the local block; 1 for the global block), each with F features per
channel (P³ embedded voxels, or all d·h·w positions).

Modes:
- ``cross`` — the step's first forward on ``[X_L; X_U]``: labeled channels attend to the channels of all
  unlabeled samples of the batch and vice versa, one head of N·C projected channels; the unlabeled
  side enters detached (ref).
- ``self`` — each sample attends to its own channels with N heads.
- ``paired`` — like ``cross`` but each sample is paired with itself (inference with the labeled decoder).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Mode = Literal["cross", "self", "paired"]

LAYER_NORM_EPS = 1e-6
SCORE_NORM_EPS = 1e-5  # ψ: InstanceNorm's default eps


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """ψ: instance-normalise each score matrix over its last two axes (no affine, biased variance).

    Statistics are always the instance's own, in training and in eval (ref).
    """
    var, mean = torch.var_mean(scores, dim=(-2, -1), correction=0, keepdim=True)
    return (scores - mean) * torch.rsqrt(var + SCORE_NORM_EPS)


class ChannelAttention(nn.Module):
    """Multi-head attention across channels.

    Inputs are grouped tokens (b, G, F, C); ``q, k, v`` map C → N·C without bias, ``out`` maps N·C → C.
    ``head_split`` says where head ``n`` finds its channel ``c`` among the N·C projected channels when
    splitting in self mode: ``"cn"`` → index c·N + n (local block, ref), ``"nc"`` → n·C + c (global
    block, ref). Heads are always merged back at c·N + n.
    """

    def __init__(self, channels: int, num_heads: int, *, head_split: Literal["cn", "nc"],
                 dropout: float, output_dropout: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_split = head_split
        self.q = nn.Linear(channels, num_heads * channels, bias=False)
        self.k = nn.Linear(channels, num_heads * channels, bias=False)
        self.v = nn.Linear(channels, num_heads * channels, bias=False)
        self.out = nn.Linear(num_heads * channels, channels, bias=False)
        self.attn_dropout = nn.Dropout(dropout)
        # The reference has no dropout after the output projection of local self-attention.
        self.out_dropout = nn.Dropout(dropout) if output_dropout else nn.Identity()

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (..., Cq, F), k and v (..., Ck, F) → (..., Cq, F): softmax(ψ(q kᵀ)) v over the key axis."""
        probs = self.attn_dropout(torch.softmax(normalize_scores(q @ k.transpose(-2, -1)), dim=-1))
        return probs @ v

    def forward(self, tokens: torch.Tensor, mode: Mode, n_labeled: int | None = None) -> torch.Tensor:
        """tokens (b, G, F, C) → (b, G, F, C). ``n_labeled`` (cross mode) = number of leading labeled samples."""
        if mode == "self":
            return self.out_dropout(self.out(self._self_attention(tokens)))
        if mode == "paired":
            q, k, v = (proj(tokens).transpose(-2, -1) for proj in (self.q, self.k, self.v))
            mixed = self._attend(q, k, v)  # (b, G, N·C, F): one head, projected order
        else:
            mixed = torch.cat(self._cross_attention(tokens, n_labeled), dim=0)
        return self.out_dropout(self.out(mixed.transpose(-2, -1)))

    def _self_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, G, F, C) → merged heads (b, G, F, N·C) at index c·N + n."""
        b, g, f, _ = tokens.shape
        n = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:  # (b, G, F, N·C) → (b, G, N, C, F)
            if self.head_split == "cn":
                return x.view(b, g, f, -1, n).permute(0, 1, 4, 3, 2)
            return x.view(b, g, f, n, -1).permute(0, 1, 3, 4, 2)

        heads = self._attend(split(self.q(tokens)), split(self.k(tokens)), split(self.v(tokens)))
        return heads.permute(0, 1, 4, 3, 2).reshape(b, g, f, -1)  # (b, G, F, C, N) → c·N + n

    def _cross_attention(self, tokens: torch.Tensor, n_labeled: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Labeled queries attend to every unlabeled sample's channels and vice versa.

        Returns the labeled and unlabeled outputs, each (b_side, G, N·C, F) in projected order.
        """
        b, g, f, _ = tokens.shape
        if n_labeled is None or not 0 < n_labeled < b:
            raise ValueError(f"cross mode needs 0 < n_labeled < batch size, got n_labeled={n_labeled}, batch={b}")
        labeled, unlabeled = tokens[:n_labeled], tokens[n_labeled:].detach()  # ref: unlabeled side detached

        def project(x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # → q, k, v each (b_side, G, N·C, F)
            return tuple(proj(x).transpose(-2, -1) for proj in (self.q, self.k, self.v))

        def pool(x: torch.Tensor) -> torch.Tensor:  # (b_side, G, N·C, F) → (G, b_side·N·C, F): all samples' channels
            return x.transpose(0, 1).reshape(g, -1, f)

        q_l, k_l, v_l = project(labeled)
        q_u, k_u, v_u = project(unlabeled)
        out_l = self._attend(q_l, pool(k_u), pool(v_u))
        out_u = self._attend(q_u, pool(k_l), pool(v_l))
        return out_l, out_u


class SKCMBlock(nn.Module):
    """One SKCM block: token embedding → channel attention → residual → LayerNorm → Conv1×1×1 → GELU.

    ``local=True``: Conv3d(1 → P³, kernel = stride = P) on each channel, every P×P×P patch position its
    own attention group. ``local=False``: Conv3d(1 → d·h·w, kernel = stride = (d, h, w)), one group.
    ``forward(x5, mode, n_labeled)``: (b, C, d, h, w) → (b, C, d, h, w).
    """

    def __init__(self, channels: int, bottleneck: tuple[int, int, int], num_heads: int, *,
                 local: bool, local_patch: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.bottleneck = tuple(bottleneck)
        self.local = local
        self.local_patch = local_patch
        d, h, w = self.bottleneck
        if local:
            if any(s % local_patch for s in self.bottleneck):
                raise ValueError(f"SKCM local block: bottleneck {self.bottleneck} is not divisible by "
                                 f"the local patch size {local_patch}")
            self.token_embed = nn.Conv3d(1, local_patch**3, local_patch, stride=local_patch)
        else:
            self.token_embed = nn.Conv3d(1, d * h * w, self.bottleneck, stride=self.bottleneck)
        self.attn_norm = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.attn = ChannelAttention(channels, num_heads, head_split="cn" if local else "nc",
                                     dropout=dropout, output_dropout=not local)
        self.out_norm = nn.LayerNorm(channels, eps=LAYER_NORM_EPS)
        self.out_conv = nn.Sequential(nn.Conv3d(channels, channels, 1), nn.GELU())

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(b, C, d, h, w) → grouped tokens (b, G, F, C), each channel embedded as a 1-channel image."""
        b, c = x.shape[:2]
        e = self.token_embed(x.reshape(b * c, 1, *x.shape[2:]))  # (b·C, F, *grid)
        return e.view(b, c, e.shape[1], -1).permute(0, 3, 2, 1)   # (b, G, F, C)

    def _ungroup(self, tokens: torch.Tensor) -> torch.Tensor:
        """(b, G, F, C) → (b, C, d, h, w); local: the P³ features of patch (i,j,k) go to its P³ voxels."""
        b, _, _, c = tokens.shape
        x = tokens.permute(0, 3, 2, 1)  # (b, C, F, G)
        if not self.local:
            return x.reshape(b, c, *self.bottleneck)
        p = self.local_patch
        d, h, w = (s // p for s in self.bottleneck)
        x = x.reshape(b, c, p, p, p, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # sub-voxel order depth, height, width
        return x.reshape(b, c, *self.bottleneck)

    def forward(self, x: torch.Tensor, mode: Mode, n_labeled: int | None = None) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.bottleneck:
            raise ValueError(f"SKCM was built for bottleneck {self.bottleneck} (patch {tuple(16 * s for s in self.bottleneck)}), "
                             f"got {tuple(x.shape[2:])}: the global token embedding is tied to the patch size")
        e = self._embed(x)
        a = self.attn(self.attn_norm(e), mode, n_labeled)
        return self.out_conv(self._ungroup(self.out_norm(a + e)))


class SKCM(nn.Module):
    """Local then global SKCM block on the bottleneck: (b, C, d, h, w) → (b, C, d, h, w)."""

    def __init__(self, channels: int, bottleneck: tuple[int, int, int], num_heads: int, *,
                 local_patch: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.local_block = SKCMBlock(channels, bottleneck, num_heads, local=True,
                                     local_patch=local_patch, dropout=dropout)
        self.global_block = SKCMBlock(channels, bottleneck, num_heads, local=False, dropout=dropout)

    def forward(self, x: torch.Tensor, mode: Mode, n_labeled: int | None = None) -> torch.Tensor:
        return self.global_block(self.local_block(x, mode, n_labeled), mode, n_labeled)
