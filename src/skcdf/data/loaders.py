"""PyTorch datasets that feed training and validation from a prepared data set (SPEC §2).

Each item is one case: the whole volume is normalised (CT window clip, then min-max to [0, 1] per
volume; or the data set's z-score, :mod:`skcdf.data.intensity`), a patch is cut out (random for
training, uniformly or centred on foreground as :mod:`skcdf.data.sampling` says, central for
validation; a volume smaller than the patch along an axis lies at a random place in a training patch
and in the centre of a validation crop, padded with the normalised air (:attr:`Normalization.background`)
in the image and background in the label; volumes may differ in size), and training patches are flipped
along H and W with probability 0.5 each: as drawn (``flips="reference"``), keeping left and right
(``"laterality"``: see :mod:`skcdf.data.laterality`), or not at all (``"none"``).

Randomness comes from torch's generator only (``torch.randint``/``torch.rand``), which a DataLoader
seeds per worker from its own ``generator``: a seeded DataLoader reproduces its batches exactly (for
a given number of workers).

Small data sets are best kept in memory (``cache=True``: normalised float32 volumes, shared with
forked DataLoader workers); large ones are memory-mapped (``cache=False``: each item reads only its
patch from the ``.npy`` files, normalised with each volume's intensity range found once up front).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from skcdf.data.classes import CT_WINDOW
from skcdf.data.intensity import Normalization
from skcdf.data.laterality import FLIP_MODES, FlipMode, Laterality, flip_plan, left_right_axis, swap_labels
from skcdf.data.layout import load_geometry, load_image, load_label
from skcdf.data.sampling import PatchSampler, PatchSampling, centred_starts, start_range
from skcdf.data.stats import class_voxel_counts
from skcdf.utils import InputError

__all__ = ["PatchDataset", "CenterCropDataset", "WholeVolumeDataset", "class_voxel_counts"]

Region = tuple[tuple[slice, ...], tuple[slice, ...]]
#: A CT window (low, high) for min-max scaling, None (min-max without clipping), or any normalisation.
Window = Union[Sequence[float], None, Normalization]


def crop_region(shape: Sequence[int], patch_size: Sequence[int], starts: Sequence[int]) -> Region:
    """Where a patch starting at ``starts`` reads from a volume of ``shape`` and where it writes in the patch.

    Along an axis where the volume is smaller than the patch, the whole axis is read and the start lies in
    ``[size - patch, 0]``: the volume is written ``-start`` voxels into the patch.
    Returns:
        (source slices into the volume, destination slices into the patch).
    """
    source, destination = [], []
    for size, patch, start in zip(shape, patch_size, starts):
        if size >= patch:
            source.append(slice(start, start + patch))
            destination.append(slice(0, patch))
        else:
            low, high = start_range(size, patch)
            if not low <= start <= high:
                raise ValueError(f"start {start} puts a volume of {size} voxels outside a patch of {patch}")
            source.append(slice(0, size))
            destination.append(slice(-start, size - start))
    return tuple(source), tuple(destination)


def central_start(size: int, patch: int) -> int:
    """The start that centres a patch on a larger volume, or a smaller volume in the patch."""
    return (size - patch) // 2 if size >= patch else -((patch - size) // 2)


def _case_left_right_axis(root: Path, case_id: str) -> int:
    """The array axis of the case's volume along the patient's left-right, from its geometry json (W without one)."""
    geometry = load_geometry(root, case_id)
    return left_right_axis(None if geometry is None else geometry.direction)


class _CaseVolumes(Dataset):
    """The normalised images (and labels) of some cases, and the cutting of patches from them."""

    def __init__(self, root: str | os.PathLike, case_ids: Sequence[str], patch_size: Sequence[int], *,
                 with_labels: bool, window: Window, cache: bool) -> None:
        self.root = Path(root)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.with_labels = with_labels
        self.normalization = window if isinstance(window, Normalization) else \
            Normalization(None if window is None else (float(window[0]), float(window[1])))
        self.cache = cache
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be three positive sizes (D, H, W), not {patch_size}")
        # cache: normalised float32 volumes; otherwise each volume's intensity range, for scaling patches.
        self._images: list[np.ndarray] = []
        self._ranges: list[tuple[float, float]] = []
        self._labels: list[np.ndarray] = []
        for case_id in self.case_ids:
            image = load_image(self.root, case_id, mmap=not cache)
            if cache:
                self._images.append(self.normalization(image))
            else:
                self._ranges.append(self.normalization.value_range(image))
            if with_labels:
                label = load_label(self.root, case_id, mmap=not cache)
                if label.shape != image.shape:
                    raise InputError(f"{self.root}: case {case_id} has label shape {label.shape} "
                                     f"but image shape {image.shape}")
                self._labels.append(label)

    def __len__(self) -> int:
        return len(self.case_ids)

    def volume_shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self._images[index].shape) if self.cache else tuple(self._image_file(index).shape)

    def _image_file(self, index: int) -> np.ndarray:
        return load_image(self.root, self.case_ids[index], mmap=True)

    def _patch(self, index: int, starts: Sequence[int], flip_axes: Sequence[int],
               swap: tuple[tuple[int, int], ...] = (), size: Sequence[int] | None = None) -> dict:
        """The item: image (1, D, H, W) float32, label (D, H, W) int64 if labeled, case id.

        The patch (of ``size``, default the patch size) is flipped along ``flip_axes``; the labels of
        each ``swap`` pair are then exchanged.
        """
        size = tuple(size or self.patch_size)
        source, destination = crop_region(self.volume_shape(index), size, starts)
        image = np.full(size, self.normalization.background, dtype=np.float32)
        if self.cache:
            image[destination] = self._images[index][source]
        else:
            image[destination] = self.normalization(self._image_file(index)[source], self._ranges[index])
        item = {"image": torch.from_numpy(np.flip(image, flip_axes).copy()).unsqueeze(0),
                "case": self.case_ids[index]}
        if self.with_labels:
            label = np.zeros(size, dtype=np.int64)
            label[destination] = self._labels[index][source]
            label = np.flip(label, flip_axes)
            item["label"] = torch.from_numpy(swap_labels(label, swap) if swap else label.copy())
        return item


class PatchDataset(_CaseVolumes):
    """Training patches: a random crop of ``patch_size`` (D, H, W) from each case, randomly flipped.

    Item: ``{"image": float32 (1, D, H, W) in [0, 1], "label": int64 (D, H, W) [with_labels], "case": str}``.

    Args:
        root: prepared data set folder.
        case_ids: the cases, one item each.
        patch_size: (D, H, W) of the patch.
        with_labels: include label patches (labeled cases only).
        window: CT window (low, high) to clip to before min-max scaling; None for no clipping (MRI); or
            a :class:`~skcdf.data.intensity.Normalization` (e.g. the data set's z-score).
        flips: random flips along H and W (each drawn with p = 0.5): ``"reference"`` applies them as
            drawn; ``"laterality"`` swaps the labels of ``laterality.pairs`` when the case's left-right
            axis (from its geometry json, W without one) is flipped, and never flips that axis when
            ``laterality`` has a lateral class without a twin; ``"none"`` applies none.
        laterality: the data set's left/right classes; needed for ``"laterality"``.
        cache: keep normalised volumes in memory (True) or memory-map the .npy files (False).
        sampling: where patches are cut (:mod:`skcdf.data.sampling`; other than uniform needs labels).
    """

    def __init__(self, root: str | os.PathLike, case_ids: Sequence[str], patch_size: Sequence[int], *,
                 with_labels: bool, window: Window = CT_WINDOW, flips: FlipMode = "reference",
                 laterality: Laterality | None = None, cache: bool = True,
                 sampling: PatchSampling = PatchSampling()) -> None:
        super().__init__(root, case_ids, patch_size, with_labels=with_labels, window=window, cache=cache)
        if sampling.mode != "uniform" and not with_labels:
            raise ValueError(f"patch sampling {sampling.mode!r} needs with_labels=True")
        self.sampler = PatchSampler(sampling, self._labels)
        if flips not in FLIP_MODES:
            raise ValueError(f"flips must be one of {', '.join(FLIP_MODES)}, got {flips!r}")
        if flips == "laterality" and laterality is None:
            raise ValueError("flips='laterality' needs the data set's laterality "
                             "(skcdf.data.laterality.find_laterality)")
        self.flips = flips
        self.laterality = laterality or Laterality()
        # per case: the array axis along the patient's left-right (only laterality flips look at it)
        self._lr_axes = [_case_left_right_axis(self.root, case_id) if flips == "laterality" else 2
                         for case_id in self.case_ids]

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        """Item ``index``, its crop and flips drawn from torch's global generator; or, for an
        ``(index, seed)`` pair, from a generator seeded with ``seed``: then the item is the same in
        whichever process loads it (the trainer's samplers yield such pairs)."""
        generator = None
        if isinstance(index, tuple):
            index, seed = index
            generator = torch.Generator().manual_seed(seed)
        shape = self.volume_shape(index)
        # a volume smaller than the patch lands anywhere in it, so that no position in the patch is its own
        starts = [int(torch.randint(low, high + 1, (), generator=generator))
                  for low, high in (start_range(size, patch) for size, patch in zip(shape, self.patch_size))]
        # drawn in every mode, so that the random stream does not depend on it
        drawn = [axis for axis, flip in zip((1, 2), torch.rand(2, generator=generator) < 0.5) if flip]
        centre = self.sampler.centre(index, shape, generator)  # after the reference's draws: uniform is unchanged
        if centre is not None:
            starts = centred_starts(centre, shape, self.patch_size)
        flip_axes, swap = flip_plan(self.flips, drawn, self._lr_axes[index], self.laterality)
        return self._patch(index, starts, flip_axes, self.laterality.pairs if swap else ())


class CenterCropDataset(_CaseVolumes):
    """Validation patches: the central ``patch_size`` (D, H, W) crop of each labeled case, no flips.

    Item keys as :class:`PatchDataset` (always with ``"label"``).
    """

    def __init__(self, root: str | os.PathLike, case_ids: Sequence[str], patch_size: Sequence[int], *,
                 window: Window = CT_WINDOW, cache: bool = True) -> None:
        super().__init__(root, case_ids, patch_size, with_labels=True, window=window, cache=cache)

    def __getitem__(self, index: int) -> dict:
        starts = [central_start(size, patch) for size, patch in zip(self.volume_shape(index), self.patch_size)]
        return self._patch(index, starts, [])


class WholeVolumeDataset(_CaseVolumes):
    """Validation volumes: each labeled case whole, no flips, for a sliding window (``val_region: whole``).

    Item keys as :class:`PatchDataset` (always with ``"label"``), at the volume's own size (D, H, W);
    ``patch_size`` is the window the volumes will be scored with.
    """

    def __init__(self, root: str | os.PathLike, case_ids: Sequence[str], patch_size: Sequence[int], *,
                 window: Window = CT_WINDOW, cache: bool = True) -> None:
        super().__init__(root, case_ids, patch_size, with_labels=True, window=window, cache=cache)

    def __getitem__(self, index: int) -> dict:
        return self._patch(index, [0, 0, 0], [], size=self.volume_shape(index))
