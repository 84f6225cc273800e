"""GenericSSL (Wang & Li, NeurIPS 2023: towards a generic semi-supervised framework for volumetric medical
image segmentation, "A&D") as xmed-lab/GenericSSL's ``code/train_diffusion.py`` trains it.

One VNet encoder E (its stages add a time embedding when given one) and three decoders (``DiffVNet``):

* D_ξ, the denoiser: from cat(x, y_t) and the time t it predicts the one-hot label y_0 (x_0 prediction,
  linear β schedule, 1000 steps), trained on labeled cases with y_t = √ᾱ_t (2·onehot(y) − 1) + √(1 − ᾱ_t) ε;
* D_ψ, trained on labeled cases with DHC's difficulty-aware class weights (:class:`~skcdf.methods.dhc.DiffDW`
  without its max-normalisation) from D_ξ's prediction;
* D_θ, trained on unlabeled cases with pseudo-labels, and before every iteration moved towards the mean of
  the other two: θ ← w θ + (1 − w)(ξ + ψ)/2 (w = 0.99). It predicts at test time (``test.py``).

One iteration (both batches strongly augmented first, :func:`strong_augment`):

    loss = DiceCE(D_ξ(x_l, y_t, t), y) + DiceCE_w(D_ψ(x_l), y) + μ(epoch) · DiceCE(D_θ(x_u), ŷ_u)
    ŷ_u = argmax[ G ∗ gumbel_softmax(DDIM_10(x_u)) + softmax(D_ψ(x_u)) ]

with DDIM_10 the x_0 prediction of a 10-step DDIM (η = 0) from Gaussian noise, G a 3×3×3 Gaussian filter
(σ = 1), DiceCE = CE − soft Dice (DHC's convention, :func:`~skcdf.methods.common.dice_ce`) and μ the ramped
weight (``method_weight``). One SGD step updates every parameter, D_θ's included.
Where the paper and the code differ this follows the code (tests/fixtures/genericssl/README.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, map_coordinates
from torch import Tensor, nn

from skcdf.device import fp32_where_cpu_bf16_fails
from skcdf.methods.common import ReplayableDropout3d, WeightSchedule, dice_ce
from skcdf.methods.dhc import DiffDW
from skcdf.methods.plugin import Context, Recipe

#: Loss terms returned by :func:`genericssl_step` (``sup`` = ``deno`` + ``diff``).
LOSS_TERMS = ("deno", "diff", "sup", "unsup", "mu", "total")
TIME_DIM = 128  # the sinusoidal time embedding's width; its MLP maps it to 4 × TIME_DIM

# --------------------------------------------------------------------------------------------------
# Network (``code/DiffVNet/diff_vnet.py``; parameter names as there, so that its state dicts load)
# --------------------------------------------------------------------------------------------------


def _swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def timestep_embedding(t: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    """The sinusoidal embedding of integer times t (b,) → (b, dim): [sin(t f), cos(t f)], f_i = 10000^(−i/(dim/2 − 1));
    the frequencies in float32 as the code computes them, the product in ``dtype``."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1))).to(t.device)
    angles = t.to(dtype)[:, None] * freqs.to(dtype)[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class _TimeFusion(nn.Module):
    """x + Linear(swish(temb)) per channel; x unchanged without a time embedding (``TembFusion``)."""

    def __init__(self, channels: int, time_dim: int) -> None:
        super().__init__()
        self.temb_proj = nn.Linear(4 * time_dim, channels)

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        return x if temb is None else x + self.temb_proj(_swish(temb))[:, :, None, None, None]


class _ConvStage(nn.Module):
    """Conv3d 3×3×3 → ReLU → BatchNorm3d → Dropout3d(0.1) [→ time fusion]: (b, c_in, …) → (b, c_out, …)."""

    def __init__(self, c_in: int, c_out: int, dropout: nn.Module, time_dim: int | None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm = nn.BatchNorm3d(c_out)
        self.dropout = dropout
        self.temb_fusion = _TimeFusion(c_out, time_dim) if time_dim else None

    def forward(self, x: Tensor, temb: Tensor | None) -> Tensor:
        x = self.dropout(self.norm(F.relu(fp32_where_cpu_bf16_fails(self.conv, x))))
        return x if self.temb_fusion is None else self.temb_fusion(x, temb)


class _ConvBlock(nn.Module):
    """``n`` stages; with ``time_dim`` all but the last fuse the time embedding (``ConvBlockTemb``)."""

    def __init__(self, n: int, c_in: int, c_out: int, dropout: nn.Module, time_dim: int | None) -> None:
        super().__init__()
        self.ops = nn.ModuleList(_ConvStage(c_in if i == 0 else c_out, c_out, dropout, time_dim if i < n - 1 else None)
                                 for i in range(n))

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        for stage in self.ops:
            x = stage(x, temb)
        return x


class _Resample(nn.Module):
    """Conv3d (down) or ConvTranspose3d (up), kernel 2 stride 2 → ReLU → BatchNorm3d [→ time fusion]."""

    def __init__(self, c_in: int, c_out: int, up: bool, time_dim: int | None) -> None:
        super().__init__()
        conv = (nn.ConvTranspose3d if up else nn.Conv3d)(c_in, c_out, 2, padding=0, stride=2)
        layers = [conv, nn.ReLU(), nn.BatchNorm3d(c_out)]
        self.ops = nn.ModuleList(layers + ([_TimeFusion(c_out, time_dim)] if time_dim else []))

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.ops[2](F.relu(self.ops[0](x)))
        return self.ops[3](x, temb) if len(self.ops) > 3 else x


class _Encoder(nn.Module):
    """Stages of 2, 3, 3, 3 conv stages after strided downsamplings (``Encoder_denoise``):
    x1 (b, f, D, H, W) → x1 … x5 (x5: (b, 16 f, D/16, H/16, W/16)); Dropout3d(0.5) on x5 if ``dropout``."""

    def __init__(self, filters: int, stage_dropout: nn.Module, dropout: nn.Module | None, time_dim: int) -> None:
        super().__init__()
        self.block_one_dw = _Resample(filters, 2 * filters, False, time_dim)
        for i, (name, depth) in enumerate(zip(("two", "three", "four", "five"), (2, 3, 3, 3))):
            width = filters * 2 ** (i + 1)
            setattr(self, f"block_{name}", _ConvBlock(depth, width, width, stage_dropout, time_dim))
            if name != "five":
                setattr(self, f"block_{name}_dw", _Resample(width, 2 * width, False, time_dim))
        self.dropout = dropout

    def forward(self, x1: Tensor, temb: Tensor | None) -> tuple[Tensor, ...]:
        x2 = self.block_two(self.block_one_dw(x1, temb), temb)
        x3 = self.block_three(self.block_two_dw(x2, temb), temb)
        x4 = self.block_four(self.block_three_dw(x3, temb), temb)
        x5 = self.block_five(self.block_four_dw(x4, temb), temb)
        if self.dropout is not None:
            x5 = self.dropout(x5)
        return x1, x2, x3, x4, x5


class _Decoder(nn.Module):
    """Upsamplings with additive skips and 3, 3, 2, 1 conv stages, Dropout3d(0.5) on the last feature map if
    ``dropout``, a 1×1×1 head: x1 … x5 → logits (b, K, D, H, W). With ``time_dim``: ``Decoder_denoise``."""

    def __init__(self, filters: int, num_classes: int, stage_dropout: nn.Module, dropout: nn.Module | None,
                 time_dim: int | None) -> None:
        super().__init__()
        self.block_five_up = _Resample(16 * filters, 8 * filters, True, time_dim)
        for name, depth, width in (("six", 3, 8 * filters), ("seven", 3, 4 * filters), ("eight", 2, 2 * filters)):
            setattr(self, f"block_{name}", _ConvBlock(depth, width, width, stage_dropout, time_dim))
            setattr(self, f"block_{name}_up", _Resample(width, width // 2, True, time_dim))
        self.block_nine = _ConvBlock(1, filters, filters, stage_dropout, time_dim)
        self.out_conv = nn.Conv3d(filters, num_classes, 1, padding=0)
        self.dropout = dropout

    def forward(self, x1: Tensor, x2: Tensor, x3: Tensor, x4: Tensor, x5: Tensor, temb: Tensor | None = None) -> Tensor:
        x = self.block_five_up(x5, temb) + x4
        x = self.block_six_up(self.block_six(x, temb), temb) + x3
        x = self.block_seven_up(self.block_seven(x, temb), temb) + x2
        x = self.block_eight_up(self.block_eight(x, temb), temb) + x1
        x9 = self.block_nine(x, temb)
        return self.out_conv(x9 if self.dropout is None else self.dropout(x9))


class _Stem(nn.Module):
    """One conv stage to ``filters`` channels, and (``time_dim``) the time MLP ``temb.dense``: Linear → swish →
    Linear (``TimeStepEmbedding``)."""

    def __init__(self, c_in: int, filters: int, stage_dropout: nn.Module, time_dim: int | None = None) -> None:
        super().__init__()
        if time_dim:
            self.temb = nn.Module()
            self.temb.dense = nn.ModuleList([nn.Linear(time_dim, 4 * time_dim), nn.Linear(4 * time_dim, 4 * time_dim)])
        self.emb = _ConvBlock(1, c_in, filters, stage_dropout, None)


class _Denoiser(nn.Module):
    """D_ξ with its stem (``DenoiseModel``): (y_t (b, K, …), t (b,) int64, x (b, C, …)) → x_0 logits (b, K, …)."""

    def __init__(self, in_channels: int, num_classes: int, filters: int, stage_dropout: nn.Module,
                 dropout: nn.Module | None, time_dim: int) -> None:
        super().__init__()
        self.time_dim = time_dim
        self.embedding_diffusion = _Stem(in_channels + num_classes, filters, stage_dropout, time_dim)
        self.encoder = _Encoder(filters, stage_dropout, dropout, time_dim)
        self.decoder = _Decoder(filters, num_classes, stage_dropout, dropout, time_dim)

    def forward(self, y_t: Tensor, t: Tensor, image: Tensor) -> Tensor:
        dense = self.embedding_diffusion.temb.dense
        temb = dense[1](_swish(dense[0](timestep_embedding(t, self.time_dim, image.dtype))))
        x1 = self.embedding_diffusion.emb(torch.cat([image, y_t], dim=1))
        return self.decoder(*self.encoder(x1, temb), temb)


class GenericSSLNet(nn.Module):
    """GenericSSL's ``DiffVNet(n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout)``.

    ``denoise_model`` (D_ξ, :class:`_Denoiser`, whose encoder is the shared E), ``decoder_psi``, ``decoder_theta``
    and the image stem ``embedding``. ``forward(x)``: x (b, C, D, H, W), sides divisible by 16 → D_θ's logits
    (b, K, D, H, W), the test-time rule. Every conv stage has a Dropout3d(0.1) (one shared
    :class:`~skcdf.methods.common.ReplayableDropout3d`, ``dropout_stage``); with ``dropout`` x5 and the last
    feature maps have Dropout3d(0.5) (``dropout``). Parameters the code creates but never uses (the image stem's
    time MLP, the time fusions of every block's last stage) are left out: :func:`from_genericssl_state_dict`.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, filters: int = 32, *, dropout: bool = True,
                 time_dim: int = TIME_DIM) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_stage = ReplayableDropout3d(0.1)
        self.dropout = ReplayableDropout3d(0.5) if dropout else None
        self.embedding = _Stem(in_channels, filters, self.dropout_stage)
        self.decoder_theta = _Decoder(filters, num_classes, self.dropout_stage, self.dropout, None)
        self.decoder_psi = _Decoder(filters, num_classes, self.dropout_stage, self.dropout, None)
        self.denoise_model = _Denoiser(in_channels, num_classes, filters, self.dropout_stage, self.dropout, time_dim)

    def _features(self, image: Tensor) -> tuple[Tensor, ...]:
        return self.denoise_model.encoder(self.embedding.emb(image), None)

    def psi(self, image: Tensor) -> Tensor:
        """D_ψ(E(x)): (b, C, …) → logits (b, K, …)."""
        return self.decoder_psi(*self._features(image))

    def forward(self, image: Tensor) -> Tensor:
        """D_θ(E(x)): (b, C, …) → logits (b, K, …)."""
        return self.decoder_theta(*self._features(image))


def _unused(net: GenericSSLNet) -> tuple[str, ...]:
    """Key prefixes of what ``DiffVNet`` builds and never uses: the image stem's time MLP, and the time fusion
    of the last stage of every block (``ConvBlockTemb`` gives it one and skips it)."""
    last_stages = (f"{name}.ops.{len(block.ops) - 1}.temb_fusion." for name, block in net.named_modules()
                   if isinstance(block, _ConvBlock))
    return ("embedding.temb.", *last_stages)


def from_genericssl_state_dict(net: GenericSSLNet, state_dict: Mapping[str, Tensor]) -> GenericSSLNet:
    """Load a ``DiffVNet`` state dict: every key of ``net`` must be there; the extra keys may only be the
    parameters the code never uses. Dtypes are converted to the net's."""
    ours, unused = net.state_dict(), _unused(net)
    missing = set(ours) - set(state_dict)
    extra = [key for key in state_dict if key not in ours and not key.startswith(unused)]
    if missing or extra:
        raise KeyError(f"not a matching DiffVNet state dict: missing {sorted(missing)}, unexpected {extra}")
    net.load_state_dict({key: state_dict[key] for key in ours})
    return net


@torch.no_grad()
def update_theta(net: GenericSSLNet, ema_w: float) -> None:
    """θ ← w θ + (1 − w)(ξ + ψ)/2 over D_θ's parameters (their namesakes in D_ξ and D_ψ); buffers stay."""
    xi, psi = net.denoise_model.decoder.state_dict(), net.decoder_psi.state_dict()
    for name, theta in net.decoder_theta.named_parameters():
        theta.copy_(ema_w * theta + (1 - ema_w) * (xi[name] + psi[name]) / 2.0)


# --------------------------------------------------------------------------------------------------
# Diffusion (``guided_diffusion``: SpacedDiffusion, x_0 prediction, DDIM with η = 0)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A respaced linear-β diffusion: ``steps`` of the ``total`` kept, evenly (``space_timesteps``).

    alphas_cumprod: ᾱ of the kept steps (K,), recomputed through their β as the code does; timesteps: the
    original step of each (K,), which the denoiser is given.
    """

    alphas_cumprod: np.ndarray
    timesteps: np.ndarray

    @classmethod
    @functools.lru_cache(maxsize=None)
    def linear(cls, steps: int, total: int = 1000) -> Schedule:
        scale = 1000 / total
        base = np.cumprod(1.0 - np.linspace(scale * 0.0001, scale * 0.02, total, dtype=np.float64), axis=0)
        stride, index, taken = (total - 1) / (steps - 1) if steps > 1 else 1, 0.0, set()
        for _ in range(steps):
            taken.add(round(index))
            index += stride
        kept = sorted(taken)
        betas, last = [], 1.0
        for i in kept:
            betas.append(1 - base[i] / last)
            last = base[i]
        return cls(np.cumprod(1.0 - np.array(betas, dtype=np.float64), axis=0), np.array(kept, dtype=np.int64))

    def coefficient(self, values: np.ndarray, t: Tensor, dtype: torch.dtype) -> Tensor:
        """values[t] as (b, 1, 1, 1, 1) in ``dtype`` (``_extract_into_tensor``)."""
        return torch.from_numpy(values).to(t.device)[t].to(dtype).view(-1, 1, 1, 1, 1)

    def q_sample(self, y0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """√ᾱ_t y0 + √(1 − ᾱ_t) ε; y0, noise (b, K, …), t (b,) step indices."""
        ab = self.alphas_cumprod
        return (self.coefficient(np.sqrt(ab), t, y0.dtype) * y0
                + self.coefficient(np.sqrt(1.0 - ab), t, y0.dtype) * noise)


@torch.no_grad()
def ddim_x0(denoiser: _Denoiser, image: Tensor, num_classes: int, schedule: Schedule,
            normal: Callable[[Tensor], Tensor]) -> Tensor:
    """The last x_0 prediction of DDIM (η = 0) from y_T = ``normal`` (b, K, …): clamp(D_ξ(x, y_t, t), −1, 1) at
    every kept step, y_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1}) ε̂. x (b, C, …) → (b, K, …)."""
    ab = schedule.alphas_cumprod
    recip, recipm1, ab_prev = np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1), np.append(1.0, ab[:-1])
    y = normal(image.new_empty((image.shape[0], num_classes, *image.shape[2:])))
    timesteps = torch.from_numpy(schedule.timesteps).to(image.device)
    for i in reversed(range(len(ab))):
        t = torch.full((image.shape[0],), i, dtype=torch.long, device=image.device)
        x0 = denoiser(y, timesteps[t], image).clamp(-1, 1)
        eps = (schedule.coefficient(recip, t, y.dtype) * y - x0) / schedule.coefficient(recipm1, t, y.dtype)
        prev = schedule.coefficient(ab_prev, t, y.dtype)
        y = x0 * torch.sqrt(prev) + torch.sqrt(1 - prev) * eps  # the last one is not used, as in the code
    return x0


@functools.lru_cache(maxsize=None)
def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """The normalised size³ Gaussian kernel of ``GaussianSmoothing``, computed in float32 as there."""
    kernel: Any = 1
    for grid in torch.meshgrid([torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"):
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp((-((grid - (size - 1) / 2) / sigma) ** 2) / 2))
    return kernel / torch.sum(kernel)


def smooth(probs: Tensor, size: int, sigma: float) -> Tensor:
    """Each channel of (b, K, …) filtered with :func:`gaussian_kernel` (zero padding, same size)."""
    weight = gaussian_kernel(size, sigma).to(probs)[None, None].repeat(probs.shape[1], 1, 1, 1, 1)
    return F.conv3d(probs, weight, groups=probs.shape[1], padding="same")


def _gumbel(logits: Tensor) -> Tensor:
    return -torch.empty_like(logits).exponential_().log()


def _uniform_timesteps(n: int, steps: int, device: torch.device) -> Tensor:
    return torch.randint(0, steps, (n,), device=device)


# --------------------------------------------------------------------------------------------------
# Strong augmentation (``code/data/StrongAug.py``, batchgenerators 0.21 as pinned): per sample, k of six
# transforms, each applied with probability p, in the reverse of the order they were drawn
# --------------------------------------------------------------------------------------------------


class AugmentDraws(Protocol):
    """The augmentation's random numbers, in the code's order (its ``random`` and ``np.random`` calls)."""

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float: ...

    def sample(self, n: int, k: int) -> list[int]: ...


class TorchAugmentDraws:
    """:class:`AugmentDraws` from torch's global CPU generator (which a checkpoint restores)."""

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(torch.rand((), dtype=torch.float64))

    def sample(self, n: int, k: int) -> list[int]:
        return torch.randperm(n)[:k].tolist()


def _warp(image: np.ndarray, label: np.ndarray | None, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample at ``coords`` (3, D, H, W): image channels cubic, label per value linear (≥ 0.5), zero outside."""
    out = np.zeros_like(image)
    for c in range(image.shape[0]):
        out[c] = map_coordinates(image[c].astype(float), coords, order=3, mode="constant", cval=0.0).astype(image.dtype)
    if label is None:
        return out, None
    new = np.zeros(label.shape, label.dtype)
    for value in np.unique(label):
        new[map_coordinates((label == value).astype(float), coords, order=1, mode="constant", cval=0.0) >= 0.5] = value
    return out, new


def _centred_mesh(shape: tuple[int, ...]) -> np.ndarray:
    coords = np.array(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")).astype(float)
    for d in range(len(shape)):
        coords[d] -= ((np.array(shape).astype(float) - 1) / 2.0)[d]
    return coords


def _spatial(image: np.ndarray, label: np.ndarray | None, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    for d in range(3):
        coords[d] += image.shape[d + 1] / 2.0 - 0.5
    return _warp(image, label, coords)


def _rotate(image: np.ndarray, label: np.ndarray | None, draws: AugmentDraws) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotation about the first axis by U(−15°, 15°) (``augment_rotation``)."""
    angle = draws.uniform(-15.0 / 360 * 2.0 * np.pi, 15.0 / 360 * 2.0 * np.pi)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    coords = _centred_mesh(image.shape[1:])
    coords = np.dot(coords.reshape(3, -1).transpose(), rotation).transpose().reshape(coords.shape)
    return _spatial(image, label, coords)


def _scale(image: np.ndarray, label: np.ndarray | None, draws: AugmentDraws) -> tuple[np.ndarray, np.ndarray | None]:
    """Zoom by 1/s, s ~ U(0.7, 1) (or U(1, 1) = 1 with probability ½) (``augment_scale``)."""
    scale = draws.uniform(0.7, 1) if draws.uniform() < 0.5 else draws.uniform(1, 1.0)
    return _spatial(image, label, _centred_mesh(image.shape[1:]) * scale)


def _blur(image: np.ndarray, draws: AugmentDraws) -> None:
    for c in range(image.shape[0]):
        draws.uniform()  # the per-channel coin (p = 1: always heads); drawn to keep the code's order
        image[c] = gaussian_filter(image[c], draws.uniform(0.7, 1.3), order=0)


def _brightness(image: np.ndarray, draws: AugmentDraws) -> None:
    draws.uniform(0.7, 1.3)  # the code draws a multiplier for all channels, then one per channel
    for c in range(image.shape[0]):
        image[c] *= draws.uniform(0.7, 1.3)


def _low_or_high(draws: AugmentDraws) -> float:
    """U(0.7, 1) or U(1, 1.3), each with probability ½."""
    return draws.uniform(0.7, 1) if draws.uniform() < 0.5 else draws.uniform(1, 1.3)


def _contrast(image: np.ndarray, draws: AugmentDraws) -> None:
    for c in range(image.shape[0]):
        mean, low, high = image[c].mean(), image[c].min(), image[c].max()
        image[c] = (image[c] - mean) * _low_or_high(draws) + mean
        image[c][image[c] < low] = low
        image[c][image[c] > high] = high


def _gamma(image: np.ndarray, draws: AugmentDraws) -> None:
    """γ-correction of the range-normalised channel, then its mean and std restored as batchgenerators 0.21
    does it (mean first, so the restored mean is off by the scaling)."""
    for c in range(image.shape[0]):
        mean, std = image[c].mean(), image[c].std()
        gamma = _low_or_high(draws)
        low = image[c].min()
        spread = float(image[c].max() - low + 1e-7)
        image[c] = np.power((image[c] - low) / spread, gamma) * spread + low
        image[c] = image[c] - image[c].mean() + mean
        image[c] = image[c] / (image[c].std() + 1e-8) * std


def _pixelwise(transform: Callable[[np.ndarray, AugmentDraws], None]) -> Callable[..., tuple]:
    def apply(image: np.ndarray, label: np.ndarray | None, draws: AugmentDraws) -> tuple[np.ndarray, np.ndarray | None]:
        transform(image, draws)
        return image, label
    return apply


#: The six transforms in the code's list order: rotation, scale, Gaussian blur, brightness, contrast, gamma.
TRANSFORMS = (_rotate, _scale, *(_pixelwise(t) for t in (_blur, _brightness, _contrast, _gamma)))


def strong_augment(image: np.ndarray, label: np.ndarray | None, draws: AugmentDraws, k: int = 3,
                   p: float = 0.7) -> tuple[np.ndarray, np.ndarray | None]:
    """``get_StrongAug(patch, k, p)`` after its random crop: k of :data:`TRANSFORMS` drawn, applied in reverse
    draw order, each with probability p (rotation and scale draw that coin first, the others too).

    image (C, D, H, W) float32; label (D, H, W) integer or None. Returns new arrays (the input is not changed).
    """
    image, label = image.copy(), None if label is None else label.copy()
    for index in reversed(draws.sample(len(TRANSFORMS), k)):
        if draws.uniform() < p:
            image, label = TRANSFORMS[index](image, label, draws)
    return image, label


def augment_batch(x: Tensor, y: Tensor | None, draws: AugmentDraws, k: int, p: float) -> tuple[Tensor, Tensor | None]:
    """:func:`strong_augment` on each sample of x (b, C, D, H, W) (in float32, on the CPU) and y (b, D, H, W)."""
    images, labels = [], []
    for i in range(x.shape[0]):
        label = None if y is None else y[i].cpu().numpy()
        image, label = strong_augment(x[i].detach().cpu().numpy().astype(np.float32), label, draws, k, p)
        images.append(image)
        labels.append(label)
    out = torch.from_numpy(np.stack(images)).to(x)
    return out, None if y is None else torch.from_numpy(np.stack(labels)).to(y)


# --------------------------------------------------------------------------------------------------
# Training step
# --------------------------------------------------------------------------------------------------


@dataclass
class GenericSSLConfig(WeightSchedule):
    """Hyper-parameters of ``train_diffusion.py`` beside μ (``-w``, ramped over ``-ep`` epochs: ``-r`` is on by
    default): the EMA weight of D_θ (``-s``), the difficulty EMA's length, the diffusion (1000 steps, 10 for
    DDIM), the pseudo-label smoothing (3, σ = 1) and the strong augmentation (``get_StrongAug(patch, 3, 0.7)``)."""

    ema_w: float = 0.99
    accumulate_iters: int = 50
    diffusion_steps: int = 1000
    sampling_steps: int = 10
    smoothing_size: int = 3
    smoothing_sigma: float = 1.0
    augment_k: int = 3
    augment_p: float = 0.7


@dataclass
class GenericSSLState:
    """The difficulty-aware class weights' statistics (``Difficulty``)."""

    difficulty: DiffDW

    def state_dict(self) -> dict[str, Any]:
        return {"difficulty": self.difficulty.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.difficulty.load_state_dict(state["difficulty"])


@dataclass
class Draws:
    """Where a step's random numbers come from: diffusion times (n, steps, device) → (n,) int64 in [0, steps);
    standard normal noise like a tensor (the diffusion's ε, then DDIM's start); Gumbel noise like a tensor; the
    augmentation's. The defaults draw from torch's generators; the replay test injects recorded ones."""

    timesteps: Callable[[int, int, torch.device], Tensor] = _uniform_timesteps
    normal: Callable[[Tensor], Tensor] = torch.randn_like
    gumbel: Callable[[Tensor], Tensor] = _gumbel
    augment: AugmentDraws = field(default_factory=TorchAugmentDraws)


def _pseudo_labels(net: GenericSSLNet, x_unlabeled: Tensor, config: GenericSSLConfig, draws: Draws) -> Tensor:
    """argmax[G ∗ gumbel_softmax(DDIM x_0) + softmax(D_ψ(x_u))]: (b_u, C, …) → (b_u, …) int64."""
    with torch.no_grad():
        x0 = ddim_x0(net.denoise_model, x_unlabeled, net.num_classes, Schedule.linear(config.sampling_steps,
                     config.diffusion_steps), draws.normal)
        psi = net.psi(x_unlabeled)
        diffusion = smooth((x0 + draws.gumbel(x0)).softmax(1), config.smoothing_size, config.smoothing_sigma)
        return (diffusion + psi.softmax(1)).argmax(1)


def genericssl_step(net: GenericSSLNet, optimizer: torch.optim.Optimizer, state: GenericSSLState, x_labeled: Tensor,
                    y_labeled: Tensor, x_unlabeled: Tensor, epoch: int, config: GenericSSLConfig,
                    draws: Draws | None = None, augment: bool = True) -> dict[str, Any]:
    """One iteration of ``train_diffusion.py``: augment, move D_θ, the three losses above, one SGD step.

    Args:
        net, optimizer: the network and the optimiser of all its parameters; ``state``: the class-weight statistics.
        x_labeled: (b_l, C, D, H, W); y_labeled: (b_l, D, H, W) int64; x_unlabeled: (b_u, C, D, H, W).
        epoch: 0-based epoch (sets μ). draws: the random numbers (default: torch's).
        augment: apply the strong augmentation (the replay feeds batches augmented by the code's loaders).
    Returns:
        ``LOSS_TERMS`` as floats, plus ``weights``, the (K,) class weights of the difficulty-weighted loss, and
        ``pseudo_labels`` (b_u, D, H, W).
    """
    draws = draws or Draws()
    if augment:
        x_labeled, y_labeled = augment_batch(x_labeled, y_labeled, draws.augment, config.augment_k, config.augment_p)
        x_unlabeled, _ = augment_batch(x_unlabeled, None, draws.augment, config.augment_k, config.augment_p)
    net.train()
    update_theta(net, config.ema_w)
    optimizer.zero_grad()
    y0 = F.one_hot(y_labeled, net.num_classes).permute(0, 4, 1, 2, 3).to(x_labeled.dtype) * 2 - 1
    noise = draws.normal(y0)
    t = draws.timesteps(x_labeled.shape[0], config.diffusion_steps, x_labeled.device)
    y_t = Schedule.linear(config.diffusion_steps, config.diffusion_steps).q_sample(y0, t, noise)
    out_xi = net.denoise_model(y_t, t, x_labeled)
    out_psi = net.psi(x_labeled)
    deno = dice_ce(out_xi, y_labeled)
    weights = state.difficulty.update(out_xi.detach(), y_labeled)
    diff = dice_ce(out_psi, y_labeled, weights)
    pseudo = _pseudo_labels(net, x_unlabeled, config, draws)
    unsup = dice_ce(net(x_unlabeled), pseudo)
    mu = config.weight_at(epoch)
    loss = deno + diff + mu * unsup
    loss.backward()
    optimizer.step()
    values = (deno, diff, deno + diff, unsup, mu, loss)
    report: dict[str, Any] = {name: float(v.detach()) if isinstance(v, Tensor) else float(v)
                              for name, v in zip(LOSS_TERMS, values)}
    report.update(weights=weights.detach().clone(), pseudo_labels=pseudo)
    return report


def _networks(in_channels: int, num_classes: int, filters: int, dropout: bool) -> dict[str, nn.Module]:
    # PyTorch's default initialisation, as make_model_all leaves it
    return {"model": GenericSSLNet(in_channels, num_classes, filters, dropout=dropout)}


def _start(networks: dict[str, nn.Module], context: Context) -> tuple[GenericSSLState, GenericSSLConfig]:
    config = GenericSSLConfig.for_context(context)
    difficulty = DiffDW(context.num_classes, config.accumulate_iters, device=context.device, normalise=False)
    return GenericSSLState(difficulty), config


# test time: D_θ (test.py: ``net(x, pred_type="D_theta_u")``)
RECIPE = Recipe(_networks, inference=("model",), start=_start, step=genericssl_step, terms=LOSS_TERMS,
                supervised="sup", unsupervised="unsup", weight="mu", trained="model")
