"""Reading scans and label maps, and intensity normalisation (SPEC §2).

Resampling to the prepared size and back lives beside the grids it works on, in
:mod:`skcdf.data.geometry`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from skcdf.data.geometry import Geometry
from skcdf.utils import InputError


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a 3-D scalar volume in any format SimpleITK reads (NIfTI, NRRD, MHA, ...).

    Raises:
        InputError: naming the file: missing, unreadable, not 3-D, not scalar, or with NaN/infinite values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
        raise InputError(f"{path}: cannot be read as an image ({reason[:200]})") from None
    if image.GetDimension() != 3:
        raise InputError(f"{path}: is a {image.GetDimension()}-D image of size {image.GetSize()}; "
                         "expected a 3-D volume")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel; "
                         "expected a grey-level volume")
    voxels = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(voxels.dtype, np.floating):
        bad = voxels.size - int(np.count_nonzero(np.isfinite(voxels)))
        if bad:
            raise InputError(f"{path}: contains {bad} NaN or infinite intensities")
    return image


def read_scan(path: str | os.PathLike, expect_ct: bool = False, series_uid: str | None = None) -> sitk.Image:
    """A scan from an image file (:func:`read_image`) or from a folder holding a DICOM series
    (:func:`skcdf.dicom.read_series`: the series with the most slices, or ``series_uid``).

    Args:
        expect_ct: DICOM only: refuse a series whose modality is not CT.

    Raises:
        InputError: naming the file or folder, see the two readers.
    """
    if Path(path).is_dir():
        from skcdf.dicom import read_series

        return read_series(path, series_uid, expect_ct)[0]
    return read_image(path)


def read_label(path: str | os.PathLike, num_classes: int) -> sitk.Image:
    """Read a label map and check its values are integers in 0..num_classes-1; returned as UInt8.

    Raises:
        InputError: as :func:`read_image`, or values that are not class indices (the message lists them).
    """
    image = read_image(path)
    values = sitk.GetArrayViewFromImage(image)
    lowest, highest = values.min(), values.max()
    if lowest < 0 or highest > num_classes - 1:
        bad = np.unique(values[(values < 0) | (values > num_classes - 1)])
        shown = ", ".join(f"{v:g}" for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise InputError(f"{path}: label values {shown} outside 0..{num_classes - 1}")
    if np.issubdtype(values.dtype, np.floating) and not np.array_equal(values, np.round(values)):
        raise InputError(f"{path}: label has non-integer values")
    return sitk.Cast(image, sitk.sitkUInt8)


def check_same_grid(image: sitk.Image, label: sitk.Image, image_path: str | os.PathLike,
                    label_path: str | os.PathLike) -> None:
    """Raise InputError (naming the label file) if the label's voxel grid differs from the image's."""
    problem = Geometry.of_image(image).mismatch(Geometry.of_image(label))
    if problem:
        raise InputError(f"{label_path}: label grid does not match image {image_path}: {problem}")


def intensity_range(volume: np.ndarray, window: Sequence[float] | None) -> tuple[float, float]:
    """The (min, max) of the volume after clipping to ``window`` (clipping commutes with min and max)."""
    low, high = float(volume.min()), float(volume.max())
    if window is not None:
        low, high = (float(np.clip(v, window[0], window[1])) for v in (low, high))
    return low, high


def scale_intensity(volume: np.ndarray, window: Sequence[float] | None,
                    value_range: tuple[float, float]) -> np.ndarray:
    """Clip to ``window`` (if given) and map ``value_range`` linearly onto [0, 1]; float32, same shape.

    Applied to a crop with the whole volume's ``value_range``, it equals cropping the normalised volume.
    """
    scaled = np.array(volume, dtype=np.float32)
    if window is not None:
        np.clip(scaled, window[0], window[1], out=scaled)
    low, high = value_range
    if high > low:
        scaled -= low
        scaled /= high - low
    else:  # a constant volume carries no contrast
        scaled[...] = 0.0
    return scaled


def normalize_intensity(volume: np.ndarray, window: Sequence[float] | None) -> np.ndarray:
    """Clip to the CT ``window`` (None: no clipping, e.g. MRI), then min-max scale per volume to [0, 1].

    Args:
        volume: (D, H, W) intensities.
    Returns:
        float32 (D, H, W) in [0, 1] (all zeros for a constant volume).
    """
    return scale_intensity(volume, window, intensity_range(volume, window))
