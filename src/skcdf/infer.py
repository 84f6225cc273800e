"""Sliding-window inference: from a trained SKCDF model to label maps that overlay the scan (SPEC §4).

Layers, from the core outward:

- :func:`sliding_window_probabilities`: softmax probabilities of one preprocessed tensor volume,
  averaged over MONAI's sliding windows (stride 16 along depth and 32 in-plane by default).
- :func:`predict_volume`: a numpy volume already on the training grid (a prepared case) -> labels.
- :func:`predict_scan` / :func:`predict_image`: a SimpleITK image on any grid -> labels (and, on
  request, probabilities) on that same grid (resampled to the training size for the network,
  probabilities resampled back one class at a time).

Files, prepared data sets, DICOM series and DICOMweb URLs in, ``<id>.nii.gz`` out: :mod:`skcdf.predict`.

The model is a :data:`Network`: either a torch module with SKCDFNet's inference interface
(``model(x, flow="unlabeled")`` and ``model.forward_labeled_decoder(x)``, each returning
``(main_logits, aux_logits)``), or an :class:`skcdf.export.OnnxModel` run by onnxruntime.
:class:`skcdf.segmenter.Segmenter` bundles a network with its preprocessing for everyday use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Literal, Union

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference
from torch import nn

from skcdf.data.classes import SYNAPSE_NAMES
from skcdf.data.geometry import Geometry, place, resample_to_size, to_original_space
from skcdf.data.laterality import FlipMode, Laterality, Pairs, class_order, find_laterality, flip_plan, left_right_axis
from skcdf.data.back_to_scan import labels_in_original_space
from skcdf.data.intensity import Normalization
from skcdf.data.spacing import check_scan_for_spacing, network_size
from skcdf.depth_chunks import DepthChunks
from skcdf.device import autocast
from skcdf.utils import InputError

if TYPE_CHECKING:
    from skcdf.export import OnnxModel

__all__ = [
    "DEFAULT_STRIDE",
    "InferenceSettings",
    "Network",
    "ScanPrediction",
    "TtaFlip",
    "argmax_labels",
    "labels_in_original_space",
    "model_logits",
    "overlap_for_stride",
    "place",
    "predict_image",
    "predict_scan",
    "predict_volume",
    "sliding_window_probabilities",
    "tta_flips",
    "volume_probabilities",
]

DEFAULT_STRIDE: tuple[int, int, int] = (16, 32, 32)


# Training flips the two in-plane axes (SPEC §2): array axes 1 and 2 of a (D, H, W) volume.
_IN_PLANE_FLIPS: tuple[tuple[int, ...], ...] = ((), (1,), (2,), (1, 2))


@dataclass(frozen=True)
class TtaFlip:
    """One pass of test-time augmentation: windows flipped along ``dims`` of ``(b, C, D, H, W)``
    (3 = H, 4 = W), then the probabilities flipped back and the channels of each ``swap`` pair
    exchanged back (a left-right flip under ``laterality`` flips)."""

    dims: tuple[int, ...] = ()
    swap: Pairs = ()


#: The reference's TTA: the four in-plane flips, no channel swaps.
_TTA_FLIPS: tuple[TtaFlip, ...] = tuple(TtaFlip(tuple(axis + 2 for axis in axes)) for axes in _IN_PLANE_FLIPS)

Decoder = Literal["unlabeled", "labeled", "mean"]
#: The test-time rules: D_u's main head (the paper's), D_l's, and the mean of the two decoders' probabilities.
DECODERS: tuple[str, ...] = ("unlabeled", "labeled", "mean")
Blend = Literal["constant", "gaussian"]

#: What predicts: a torch SKCDFNet(-like) module in eval mode, or an exported ONNX model.
Network = Union[nn.Module, "OnnxModel"]


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the network over a volume. The defaults reproduce the reference evaluation (SPEC §4).

    Attributes:
        decoder: ``"unlabeled"`` (D_u main head, the paper's choice), ``"labeled"`` (D_l main head,
            each window paired with itself, paper Table 4) or ``"mean"`` (the mean of the two heads'
            probabilities; for a Table 1 method all three are its own test-time rule); None: the
            checkpoint's, its training configuration's ``inference_decoder`` (:meth:`for_model`).
        stride: window step (D, H, W) in voxels; each entry between 1 and the patch size.
        sw_batch_size: windows per forward pass.
        blend: ``"constant"`` (equal weights, as the reference) or ``"gaussian"`` (centre-weighted).
        tta: also average over the in-plane flips used in training (up to 4 forward passes per
            window), keeping left and right as the checkpoint's ``flips`` mode says (:func:`tta_flips`);
            None: the checkpoint's ``inference_tta``.
        amp: autocast to bf16 (fp16 where bf16 is unsupported) on CUDA; prediction on the CPU always runs fp32.
        fp16_output: accumulate the sliding window's probabilities (and read its input) in float16,
            as nnU-Net does: half the memory of a whole scan's K-channel output, at ~1e-3 precision.
    """

    decoder: Decoder | None = None
    stride: tuple[int, int, int] = DEFAULT_STRIDE
    sw_batch_size: int = 4
    blend: Blend = "constant"
    tta: bool | None = None
    amp: bool = True
    fp16_output: bool = False

    def __post_init__(self) -> None:
        if self.decoder is not None and self.decoder not in DECODERS:
            raise InputError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")
        if self.blend not in ("constant", "gaussian"):
            raise InputError(f"blend must be 'constant' or 'gaussian', got {self.blend!r}")
        if self.sw_batch_size < 1:
            raise InputError(f"sw_batch_size must be at least 1, got {self.sw_batch_size}")

    def for_model(self, preprocessing: Mapping) -> "InferenceSettings":
        """These settings with the test-time rule left open (None) taken from the model's ``preprocessing``:
        its ``decoder`` and ``tta`` (:func:`skcdf.checkpoint.load_model`), else D_u without TTA."""
        return replace(self, decoder=self.decoder or preprocessing.get("decoder") or "unlabeled",
                       tta=bool(preprocessing.get("tta", False)) if self.tta is None else self.tta)


def overlap_for_stride(patch_size: Sequence[int], stride: Sequence[int]) -> tuple[float, ...]:
    """Per-axis ``overlap`` for MONAI's ``sliding_window_inference`` that steps exactly ``stride`` voxels.

    MONAI steps ``int(patch * (1 - overlap))`` voxels; ``1 - stride / patch`` can land a hair below
    ``stride`` in floating point (e.g. patch 80, stride 16 steps 15), so the overlap aims half a voxel
    above the stride instead. For patch 64×128×128 and stride 16×32×32 this visits the same windows as
    SPEC §4's ``overlap=0.75``.

    Raises:
        InputError: a stride entry outside ``[1, patch]`` (a larger stride would skip voxels).
    """
    if len(stride) != len(patch_size) or not all(1 <= s <= p for s, p in zip(stride, patch_size)):
        raise InputError(f"stride {tuple(stride)} must lie between 1 and the patch size {tuple(patch_size)} on every axis")
    return tuple(0.0 if s == p else (p - s - 0.5) / p for s, p in zip(stride, patch_size))


def model_logits(model: nn.Module, decoder: Decoder = "unlabeled") -> Callable[[torch.Tensor], torch.Tensor]:
    """The function ``x (b, 1, D, H, W) -> main-head logits (b, K, D, H, W)`` of the chosen decoder.

    ``"mean"`` gives the log of the mean of both decoders' softmax probabilities: logits whose softmax is
    that mean, so that windows, TTA and argmax treat it as any decoder's output.
    """
    def unlabeled(x: torch.Tensor) -> torch.Tensor:
        return model(x, flow="unlabeled")[0]

    def labeled(x: torch.Tensor) -> torch.Tensor:
        return model.forward_labeled_decoder(x)[0]

    def mean(x: torch.Tensor) -> torch.Tensor:
        both = torch.stack([unlabeled(x).float().log_softmax(1), labeled(x).float().log_softmax(1)])
        return torch.logsumexp(both, 0) - math.log(2)

    rules = {"unlabeled": unlabeled, "labeled": labeled, "mean": mean}
    if decoder not in rules:
        raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    return rules[decoder]


def tta_flips(mode: FlipMode, lr_axis: int, laterality: Laterality) -> tuple[TtaFlip, ...]:
    """The distinct TTA passes for a model trained with flips ``mode``, on a volume whose left-right
    runs along array axis ``lr_axis`` (0 = D, 1 = H, 2 = W; see :func:`left_right_axis`).

    ``reference``: the four in-plane flips as they are. ``laterality``, and ``none`` (whose model saw
    no flip, so none should confuse left and right): a pass that flips ``lr_axis`` swaps the pair
    channels back, and is left out when ``laterality`` has a lateral class without a twin.
    """
    rule: FlipMode = "reference" if mode == "reference" else "laterality"
    passes: list[TtaFlip] = []
    for axes in _IN_PLANE_FLIPS:
        kept, swap = flip_plan(rule, axes, lr_axis, laterality)
        flip = TtaFlip(tuple(axis + 2 for axis in kept), laterality.pairs if swap else ())
        if flip not in passes:
            passes.append(flip)
    return tuple(passes)


def _tta_for(preprocessing: Mapping, direction: Sequence[float] | None) -> tuple[TtaFlip, ...]:
    """The TTA passes of a checkpoint (its ``flips`` mode, class names or ``lateral_pairs``) on a
    volume with the direction cosines ``direction`` (None: left-right along W)."""
    names = preprocessing.get("class_names")
    laterality = find_laterality(names or SYNAPSE_NAMES, preprocessing.get("class_abbrevs") if names else None,
                                 preprocessing.get("lateral_pairs"))
    return tta_flips(preprocessing.get("flips") or "reference", left_right_axis(direction), laterality)


def sliding_window_probabilities(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    patch_size: Sequence[int],
    stride: Sequence[int] = DEFAULT_STRIDE,
    sw_batch_size: int = 4,
    mode: Blend = "constant",
    tta: bool | Sequence[TtaFlip] = False,
    amp: bool = True,
    fp16_output: bool = False,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Softmax probabilities of ``volume``, averaged over sliding windows (MONAI ``sliding_window_inference``).

    Windows of ``patch_size`` start every ``stride`` voxels along each axis, the last one flush with
    the end; where they overlap, probabilities (not logits) are averaged with equal weights
    (``mode="constant"``) or Gaussian weights (``mode="gaussian"``). A volume smaller than the patch
    is padded symmetrically with ``pad_value`` and the result cropped back.

    Args:
        model_fn: ``(n, C, *patch_size) -> logits (n, K, *patch_size)``, e.g. :func:`model_logits`.
        volume: preprocessed input, ``(1, C, D, H, W)`` float32, on the model's device.
        patch_size: window ``(D, H, W)``; for SKCDFNet with SKCM, the model's training patch.
        stride: window step ``(D, H, W)``, see :func:`overlap_for_stride`.
        sw_batch_size: windows per call of ``model_fn``.
        mode: ``"constant"`` or ``"gaussian"`` blending.
        tta: average each window over these passes (see :func:`tta_flips`); True: the four
            in-plane flips of the reference (none, H, W, both), no channel swaps; False: no TTA.
        amp: autocast ``model_fn`` on CUDA (:func:`skcdf.device.autocast`: bf16, or fp16 where bf16 is
            unsupported).
        fp16_output: MONAI accumulates in its input's dtype: pass it float16 (windows go to the model as
            float32), so the output and the window counts take half the memory.
        pad_value: what pads a volume smaller than a window: the normalised air that training padded
            with (:attr:`skcdf.data.intensity.Normalization.background`).

    Returns:
        ``(1, K, D, H, W)`` probabilities on ``volume.device``, float32 (float16 with ``fp16_output``).
    """
    overlap = overlap_for_stride(patch_size, stride)
    flips = _TTA_FLIPS if tta is True else tuple(tta) if tta else (TtaFlip(),)

    def window_probabilities(windows: torch.Tensor) -> torch.Tensor:
        total, windows = None, windows.float()
        for flip in flips:
            with autocast(volume.device, amp and volume.device.type == "cuda"):
                logits = model_fn(_flip(windows, flip.dims))
            probabilities = _unflip(torch.softmax(logits.float(), dim=1), flip)
            total = probabilities if total is None else total + probabilities
        return total / len(flips)

    with torch.inference_mode():
        return sliding_window_inference(
            volume.half() if fp16_output else volume.float(),
            roi_size=tuple(patch_size),
            sw_batch_size=sw_batch_size,
            predictor=window_probabilities,
            overlap=overlap,
            mode=mode,
            cval=pad_value,
        )


def _flip(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return x.flip(dims) if dims else x


def _unflip(probabilities: torch.Tensor, flip: TtaFlip) -> torch.Tensor:
    """``(b, K, D, H, W)`` probabilities of flipped windows, back in place and with swapped pairs swapped back."""
    probabilities = _flip(probabilities, flip.dims)
    if not flip.swap:
        return probabilities
    order = torch.from_numpy(class_order(flip.swap, probabilities.shape[1])).to(probabilities.device)
    return probabilities.index_select(1, order)


def _network_logits(model: Network, decoder: Decoder) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.device]:
    """The network's ``x (b, 1, D, H, W) -> logits (b, K, D, H, W)`` function and the device its input goes to."""
    if not isinstance(model, nn.Module):  # an ONNX model runs on the CPU through onnxruntime
        return model.logits_fn(decoder), torch.device("cpu")
    if model.training:
        raise ValueError("the model is in training mode (dropout, batch statistics): call model.eval() first")
    return model_logits(model, decoder), next(model.parameters()).device


def volume_probabilities(
    model: Network, image: np.ndarray, preprocessing: Mapping, settings: InferenceSettings,
    direction: Sequence[float] | None = None,
) -> torch.Tensor:
    """HU volume ``(D, H, W)`` on the training grid -> probabilities ``(K, D, H, W)`` on the model's device.

    ``direction``: the volume's direction cosines (SimpleITK, row-major 3×3), for laterality-keeping TTA.
    """
    return depth_window(model, image, preprocessing, settings, direction)(0, len(image))


def depth_window(
    model: Network, image: np.ndarray, preprocessing: Mapping, settings: InferenceSettings,
    direction: Sequence[float] | None = None,
) -> Callable[[int, int], torch.Tensor]:
    """The sliding window over part of a volume: ``(a, b) ->`` the probabilities ``(K, b - a, H, W)`` of
    slices ``a..b-1`` of ``image`` (HU ``(D, H, W)`` on the training grid) as if they were the whole volume.

    The volume is normalised and moved to the model's device once, here; ``image`` is not kept.
    ``direction`` as in :func:`volume_probabilities`.
    """
    settings = settings.for_model(preprocessing)
    model_fn, device = _network_logits(model, settings.decoder)
    normalization = Normalization.from_preprocessing(preprocessing)
    normalized = normalization(np.asarray(image, dtype=np.float32))
    # in float16 at once for fp16_output, so that the float32 copy is gone before the sliding window
    dtype = torch.float16 if settings.fp16_output else torch.float32
    volume = torch.from_numpy(np.ascontiguousarray(normalized)).to(device, dtype)[None, None]
    del normalized
    tta = _tta_for(preprocessing, direction) if settings.tta else False

    def probabilities(a: int, b: int) -> torch.Tensor:
        return sliding_window_probabilities(
            model_fn,
            volume[:, :, a:b],
            preprocessing["patch_size"],
            stride=settings.stride,
            sw_batch_size=settings.sw_batch_size,
            mode=settings.blend,
            tta=tta,
            amp=settings.amp,
            fp16_output=settings.fp16_output,
            pad_value=normalization.background,
        )[0]

    return probabilities


def argmax_labels(probabilities: torch.Tensor) -> np.ndarray:
    """``(K, D, H, W)`` probabilities -> ``(D, H, W)`` uint8 labels on the CPU."""
    return probabilities.argmax(0).to(torch.uint8).cpu().numpy()


def predict_volume(
    model: Network, image: np.ndarray, preprocessing: Mapping, settings: InferenceSettings = InferenceSettings(),
    direction: Sequence[float] | None = None,
) -> np.ndarray:
    """Label map of a volume that is already on the training grid (e.g. a prepared case).

    Args:
        model: an SKCDFNet-like model in eval mode on the device to run on, or an ONNX model.
        image: ``(D, H, W)`` intensities in HU (not yet windowed or scaled).
        preprocessing: the checkpoint's ``preprocessing`` dict; uses ``"window"`` (CT window or None)
            and ``"patch_size"``.
        settings: decoder, stride, blending, TTA, AMP.
        direction: the scan's direction cosines (SimpleITK's row-major 3×3, as in its geometry json),
            which tell TTA under ``laterality`` flips where left-right runs; None: along W.

    Returns:
        ``(D, H, W)`` uint8 labels.
    """
    return argmax_labels(volume_probabilities(model, image, preprocessing, settings, direction))


def _channels_in_original_space(probabilities: np.ndarray, geometry: Geometry) -> Iterator[np.ndarray]:
    """Each class's probabilities ``(d, h, w)`` on the prepared grid of ``geometry``, resampled linearly
    onto the original grid ``geometry`` (as SPEC §2 prepared them, backwards): ``(D, H, W)`` float32,
    one class at a time, so that a consumer need not hold K volumes of the original size.

    Each is a read-only view of SimpleITK's buffer (no copy), valid until the next one is asked for.
    """
    for channel in probabilities:
        # float32 also after fp16_output; the image is kept alive while its view is used
        resampled = to_original_space(channel.astype(np.float32, copy=False), geometry, is_label=False)
        yield sitk.GetArrayViewFromImage(resampled)


@dataclass(frozen=True)
class ScanPrediction:
    """The prediction of one scan, on the scan's own grid.

    Attributes:
        labels: ``(D, H, W)`` uint8 class indices.
        probabilities: ``(K, D, H, W)`` float32 softmax probabilities, when asked for (K volumes of
            the scan's size: 8.8 GB for a 512×512×600 scan with 14 classes), else None.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None


def predict_scan(
    model: Network,
    image: sitk.Image,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
    probabilities: bool = False,
    source: str = "scan",
) -> ScanPrediction:
    """Labels (and optionally probabilities) of a scan on its own grid.

    The scan is preprocessed as in training (trilinear resampling to ``preprocessing["size"]`` when
    set, or, for a model trained on the spacing-based path, to ``preprocessing["spacing"]`` over the
    whole scan; then the model's intensity normalisation), predicted with the sliding window over the
    whole resampled scan, and the softmax probabilities are resampled linearly back to the scan's grid
    before the argmax, one slab and class at a time unless the probabilities themselves are asked for;
    then the sliding window too runs a chunk of slices at a time, as the slabs need them
    (:class:`~skcdf.depth_chunks.DepthChunks`, the same values), so that its output is never held whole.

    Args:
        model: an SKCDFNet-like model in eval mode on the device to run on, or an ONNX model.
        image: a 3D scan in HU, any size, spacing, origin and direction.
        preprocessing: the checkpoint's ``preprocessing`` dict (``size``, ``window``, ``patch_size``).
        settings: decoder, stride, blending, TTA, AMP.
        probabilities: also return the ``(K, D, H, W)`` probabilities on the scan's grid.
        source: what an error message calls the scan (its file).

    Raises:
        InputError: spacing-based model only: a scan it cannot use (:func:`~skcdf.data.spacing.check_scan_for_spacing`).
    """
    if preprocessing.get("spacing") is not None:
        check_scan_for_spacing(Geometry.of_image(image), preprocessing["spacing"], source)
    size = network_size(Geometry.of_image(image), preprocessing)
    network_input = image if size is None else resample_to_size(image, tuple(size), is_label=False)
    if size is not None and not probabilities:
        window = depth_window(model, sitk.GetArrayViewFromImage(network_input), preprocessing, settings,
                              network_input.GetDirection())
        del network_input  # normalised on the model's device now
        chunks = DepthChunks(window, tuple(size), preprocessing["patch_size"][0], settings.stride[0])
        return ScanPrediction(labels_in_original_space(chunks, Geometry.of_image(image)))
    on_network_grid = volume_probabilities(model, sitk.GetArrayViewFromImage(network_input), preprocessing,
                                            settings, network_input.GetDirection()).cpu().numpy()
    if probabilities:  # float32 for the caller, also after fp16_output
        on_network_grid = on_network_grid.astype(np.float32, copy=False)
    if size is None:
        return ScanPrediction(on_network_grid.argmax(0).astype(np.uint8), on_network_grid if probabilities else None)
    geometry = Geometry.of_image(image)
    resampled = np.empty((len(on_network_grid), *reversed(geometry.size)), np.float32)
    for label, channel in enumerate(_channels_in_original_space(on_network_grid, geometry)):
        resampled[label] = channel
    return ScanPrediction(resampled.argmax(0).astype(np.uint8), resampled)


def predict_image(
    model: Network, image: sitk.Image, preprocessing: Mapping, settings: InferenceSettings = InferenceSettings(),
    source: str = "scan",
) -> sitk.Image:
    """Label map of a scan on its own grid, so that it overlays the scan in any viewer (see :func:`predict_scan`).

    Returns:
        uint8 label image with the size, spacing, origin and direction of ``image``.
    """
    return place(predict_scan(model, image, preprocessing, settings, source=source).labels, Geometry.of_image(image))


