"""What the semi-supervised baselines of DHC's code base (xmed-lab/DHC) share.

* :class:`DHCVNet`: the plain VNet all of DHC's ``train_{cps,uamt,dhc}.py`` train (one decoder, one head,
  ``Dropout3d(0.5)`` on x5 and on the last feature map, active in training). Its layers are skcdf's
  :class:`~skcdf.nn.vnet.Encoder` and :class:`~skcdf.nn.vnet.Decoder`, which have DHC's layout; only the
  dropout differs: DHC uses one module for both places, here a :class:`ReplayableDropout3d` whose masks
  can be injected. :func:`from_dhc_state_dict` loads a DHC ``VNet`` state dict.
* The DHC loss conventions (:func:`dice_ce`: CE − soft Dice, optionally class-weighted;
  :func:`masked_cross_entropy`).
* DHC's schedules (:func:`sigmoid_rampup`, :func:`weight_during_epoch`, :func:`lr_during_epoch`), which
  all move once per epoch, and :class:`WeightSchedule`, the ramped unsupervised weight every method's
  configuration extends.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skcdf.nn.vnet import Decoder, Encoder

if TYPE_CHECKING:
    from typing import Self

    from skcdf.methods.plugin import Context

# --------------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------------


class ReplayableDropout3d(nn.Module):
    """``nn.Dropout3d(p)`` whose channel masks can be injected.

    In training, each (sample, channel) map of ``x`` (b, c, D, H, W) is zeroed with probability ``p`` and
    the others are scaled by 1 / (1 − p). Masks queued with :meth:`replay` — bool (b, c), True = kept —
    are used first, one per call, in call order; with none queued the mask is drawn by torch.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self._queue: deque[Tensor] = deque()

    def replay(self, masks: Iterable[Tensor]) -> None:
        """Queue masks (bool (b, c), True = kept) for the next calls in training mode."""
        self._queue.extend(masks)

    @property
    def pending(self) -> int:
        """Number of queued masks not used yet."""
        return len(self._queue)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if not self._queue:
            return F.dropout3d(x, self.p, training=True)
        keep = self._queue.popleft()
        if tuple(keep.shape) != tuple(x.shape[:2]):
            raise ValueError(f"replayed dropout mask {tuple(keep.shape)} does not fit input {tuple(x.shape)}")
        return x * (keep.to(device=x.device, dtype=x.dtype).view(*x.shape[:2], 1, 1, 1) / (1 - self.p))


class DHCVNet(nn.Module):
    """DHC's ``VNet(n_channels, n_classes, n_filters, normalization="batchnorm", has_dropout)``.

    Encoder depths 1, 2, 3, 3, 3 and decoder depths 3, 3, 2, 1 (Conv3d 3×3×3 → BatchNorm3d → ReLU),
    strided Conv3d / ConvTranspose3d (k2 s2) → BN → ReLU between them, additive skips, one 1×1×1 head.
    ``forward(x)``: x (b, in_channels, D, H, W), each side divisible by 16 → logits (b, num_classes, D, H, W).

    With ``dropout`` one :class:`ReplayableDropout3d` (``self.dropout``) acts on x5 and then on the last
    feature map, as DHC's single ``self.dropout`` does: two masks per forward in training, x5's first.
    At the paper's width (32 filters, 14 classes) it has 37,778,126 parameters; at 16 classes 37,778,192.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 14, filters: int = 32, *, dropout: bool = True) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, filters, dropout=False)
        self.decoder = Decoder(filters, num_classes, aux_head=False, dropout=False)
        self.dropout = ReplayableDropout3d(0.5) if dropout else None
        if self.dropout is not None:  # the same module in both places, like DHC's
            self.encoder.dropout = self.dropout
            self.decoder.dropout = self.dropout

    def forward(self, x: Tensor) -> Tensor:
        main, _ = self.decoder(self.encoder(x))
        return main


_STAGE_NAMES = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DHC_KEY = re.compile(r"^block_(\w+?)(_dw|_up)?\.conv\.(.+)$")


def init_like_dhc(net: nn.Module, init: Callable[[Tensor], Any] = nn.init.kaiming_normal_) -> nn.Module:
    """DHC's ``kaiming_normal_init_weight`` (or, with ``init=nn.init.xavier_normal_``, its xavier twin):
    Conv3d weights drawn by ``init``, BatchNorm weight 1 and bias 0; everything else (conv biases,
    transposed convolutions) keeps PyTorch's default. Returns ``net``."""
    for module in net.modules():
        if isinstance(module, nn.Conv3d):
            init(module.weight)
        elif isinstance(module, nn.BatchNorm3d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return net


def dhc_to_skcdf_key(key: str) -> str:
    """Map a DHC ``VNet`` state-dict key to the :class:`DHCVNet` key (``block_one.conv.0.weight`` →
    ``encoder.stages.0.0.weight``, ``block_six_up.conv.1.bias`` → ``decoder.ups.1.1.bias``, …)."""
    if key.startswith("out_conv."):
        return "decoder.main_head." + key[len("out_conv."):]
    match = _DHC_KEY.match(key)
    if match is None or match.group(1) not in _STAGE_NAMES:
        raise KeyError(f"not a DHC VNet key: {key}")
    stage, kind, rest = _STAGE_NAMES.index(match.group(1)), match.group(2), match.group(3)
    if kind == "_dw":
        return f"encoder.downs.{stage}.{rest}"
    if kind == "_up":
        return f"decoder.ups.{stage - 4}.{rest}"
    return f"encoder.stages.{stage}.{rest}" if stage < 5 else f"decoder.stages.{stage - 5}.{rest}"


def from_dhc_state_dict(net: DHCVNet, state_dict: Mapping[str, Tensor]) -> DHCVNet:
    """Load a DHC ``VNet`` state dict into ``net`` (strict; dtypes are converted to the net's)."""
    net.load_state_dict({dhc_to_skcdf_key(k): v for k, v in state_dict.items()}, strict=True)
    return net


# --------------------------------------------------------------------------------------------------
# Losses (DHC's utils/loss.py conventions)
# --------------------------------------------------------------------------------------------------


def _loss_precision(logits: Tensor) -> Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def soft_dice_per_class(probs: Tensor, labels: Tensor, smooth: float) -> Tensor:
    """DHC's ``SoftDiceLoss`` (batch dice, no background removal, no weight) before its mean: (K,).

    probs (b, K, D, H, W) class probabilities (or one-hot); labels (b, D, H, W) int64.
    dc_c = (2 tp_c + smooth) / (2 tp_c + fp_c + fn_c + smooth + 1e-8), sums over batch and voxels;
    2 tp + fp + fn is taken as Σ probs_c + |label = c|.
    """
    num_classes = probs.shape[1]
    flat = labels.reshape(-1)
    zeros = probs.new_zeros(num_classes)
    tp = zeros.index_add(0, flat, probs.gather(1, labels.unsqueeze(1)).reshape(-1))
    count = zeros.index_add(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    predicted = probs.sum((0, *range(2, probs.ndim)))
    return (2 * tp + smooth) / (predicted + count + smooth + 1e-8)


def dice_ce(logits: Tensor, labels: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """DHC's ``DC_and_CE_loss(w_dc=w, w_ce=w)``: CE − mean foreground soft Dice (smooth 1).

    logits (b, K, D, H, W); labels (b, D, H, W) int64; class_weight (K,) or None. The CE is
    ``F.cross_entropy(weight=w)`` (mean normalised by Σ w[label]); the Dice of class c ≥ 1 is multiplied
    by w[c] before the mean over the K − 1 foreground classes. Note the sign: DHC adds −Dice, not 1 − Dice.
    """
    logits = _loss_precision(logits)
    weight = None if class_weight is None else class_weight.to(logits.dtype)
    ce = F.cross_entropy(logits, labels, weight=weight)
    dice = soft_dice_per_class(logits.softmax(1), labels, smooth=1.0)[1:]
    if weight is not None:
        dice = dice * weight[1:]
    return ce - dice.mean()


def cross_entropy(logits: Tensor, labels: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """DHC's ``RobustCrossEntropyLoss(weight=w)``: voxel-mean CE (weighted mean with w). (b, K, …), (b, …)."""
    logits = _loss_precision(logits)
    return F.cross_entropy(logits, labels, weight=None if class_weight is None else class_weight.to(logits.dtype))


def masked_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """DHC's ``WeightedCrossEntropyLoss(weight=w)(logits, target, mask)`` and ``Onehot_WeightedCrossEntropyLoss``:
    the mean over *all* voxels of w[target] · CE(logits, target) · mask (a masked voxel counts as 0, it is not
    left out of the mean; the class weight, if any, is not normalised). logits (b, K, …); target (b, …) int64;
    mask (b, …), no gradient through it; class_weight (K,) or None."""
    logits = _loss_precision(logits)
    weight = None if class_weight is None else class_weight.to(logits.dtype)
    return (F.cross_entropy(logits, target, weight=weight, reduction="none") * mask.detach().to(logits.dtype)).mean()


# --------------------------------------------------------------------------------------------------
# Schedules: DHC changes the learning rate and the unsupervised weight once per epoch, at its end
# --------------------------------------------------------------------------------------------------


def sigmoid_rampup(current: float, length: float) -> float:
    """exp(−5 (1 − t)²) with t = clip(current, 0, length) / length (Laine & Aila); 1 for length 0."""
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / length
    return float(math.exp(-5.0 * phase * phase))


def weight_during_epoch(epoch: int, weight: float, max_epoch: int, rampup: bool = True,
                        rampup_length: float | None = None) -> float:
    """The unsupervised weight ``cps_w`` in effect during ``epoch`` (0-based) of a DHC script.

    The scripts set ``cps_w = get_current_consistency_weight(0)`` before epoch 0 and
    ``get_current_consistency_weight(epoch)`` after each epoch, so epoch E ≥ 1 uses ramp(E − 1):
    ``weight · sigmoid_rampup(max(E − 1, 0), rampup_length or max_epoch)``; without ramp-up, ``weight``.
    """
    if not rampup:
        return float(weight)
    return float(weight) * sigmoid_rampup(max(epoch - 1, 0), max_epoch if rampup_length is None else rampup_length)


@dataclass
class WeightSchedule:
    """The unsupervised weight of DHC's scripts and its ramp-up (README command ``-w 0.1 -ep 300 -r``).

    weight: ``-w``, the weight after ramp-up (skcdf's ``method_weight``); max_epoch: ``-ep``, the ramp's
    length (skcdf's ``rampup_epochs``); rampup: ``-r``; rampup_length: ``-cr`` (None: max_epoch).
    Each method's configuration extends it with the hyper-parameters its script fixes.
    """

    weight: float = 0.1
    max_epoch: int = 300
    rampup: bool = True
    rampup_length: float | None = None

    @classmethod
    def for_context(cls, context: Context, **fields: Any) -> Self:
        """The configuration of a training run: its weight and ramp length from ``context``, ``fields`` as given."""
        return cls(weight=context.weight, max_epoch=context.max_epoch, **fields)

    def weight_at(self, epoch: int) -> float:
        """The unsupervised weight during ``epoch`` (DHC ramps once per epoch, one epoch late)."""
        return weight_during_epoch(epoch, self.weight, self.max_epoch, self.rampup, self.rampup_length)


def lr_during_epoch(epoch: int, base_lr: float, max_epoch: int, exponent: float = 0.9) -> float:
    """The learning rate during ``epoch`` of a DHC script: ``base_lr`` in epoch 0, then
    ``poly_lr(E − 1) = base_lr · (1 − (E − 1) / max_epoch) ** 0.9`` (set after each epoch)."""
    if epoch == 0:
        return float(base_lr)
    return float(base_lr) * (1 - (epoch - 1) / max_epoch) ** exponent
