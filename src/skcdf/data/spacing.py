"""The spacing-based path (issue 27): each scan resampled to one target voxel spacing, keeping its extent.

The paper's presets resample every scan to one fixed size whatever its spacing
(:func:`skcdf.data.geometry.resample_to_size`). Here the grid instead has about the target spacing:
``size = round(extent / target)`` voxels per axis over the scan's own physical box (voxel edge to
voxel edge, same direction), so the actual spacing is ``extent / size``, within half a voxel over the
whole extent of the target. This is nnU-Net's rule (new shape = round(old spacing / new spacing × old
shape)), and it lets :func:`skcdf.data.geometry.prepared_grid` and
:func:`skcdf.data.geometry.to_original_space` serve both paths unchanged.

Spacings are in SimpleITK's (x, y, z) order throughout, as in the geometry files.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from skcdf.data.geometry import Geometry
from skcdf.data.preprocess import read_scan
from skcdf.utils import InputError

#: nnU-Net's anisotropy threshold: an axis whose median spacing exceeds 3× the others' is "low resolution".
ANISOTROPY_THRESHOLD = 3.0
#: A scan whose spacing exceeds the target by more than this factor along an axis is refused (a localiser,
#: a thick-slab reformat): resampling it would invent most of its voxels.
MAX_SPACING_RATIO = 10.0


def target_spacing(spacings: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]]) -> tuple[float, float, float]:
    """nnU-Net's (v2, ``ExperimentPlanner.determine_fullres_target_spacing``) target spacing of a data set.

    The median spacing per axis; but when one axis is anisotropic both in spacing (its median more than
    3× the largest other one) and in voxels (its median size times 3 below the smallest other one),
    that axis takes the 10th percentile of its spacings instead (at least the largest other spacing,
    plus 1e-5), so that thin-slice scans are not thrown away to match the thick ones.

    Args:
        spacings: (N, 3) spacings of the training scans, (x, y, z) mm.
        sizes: (N, 3) their sizes in voxels, same order.
    Returns:
        the target spacing (x, y, z) mm.
    """
    spacing_table = np.asarray(spacings, dtype=np.float64)
    target = np.percentile(spacing_table, 50, axis=0)
    median_size = np.percentile(np.asarray(sizes, dtype=np.float64), 50, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(3) if axis != worst]
    largest_other = max(target[axis] for axis in others)
    anisotropic_spacing = target[worst] > ANISOTROPY_THRESHOLD * largest_other
    anisotropic_voxels = median_size[worst] * ANISOTROPY_THRESHOLD < min(median_size[axis] for axis in others)
    if anisotropic_spacing and anisotropic_voxels:
        tenth = float(np.percentile(spacing_table[:, worst], 10))
        target[worst] = largest_other + 1e-5 if tenth < largest_other else tenth
    return tuple(float(s) for s in target)


def size_for_spacing(geometry: Geometry, spacing: Sequence[float]) -> tuple[int, int, int]:
    """The (D, H, W) size of the grid at about ``spacing`` (x, y, z) over ``geometry``'s box:
    round(extent / spacing) voxels per axis, at least 1."""
    extent = np.asarray(geometry.size, dtype=np.float64) * np.asarray(geometry.spacing, dtype=np.float64)
    size_xyz = np.maximum(1, np.round(extent / np.asarray(spacing, dtype=np.float64))).astype(int)
    return tuple(int(n) for n in size_xyz[::-1])


def check_spacing(spacing: Sequence[float], what: str) -> tuple[float, float, float]:
    """``spacing`` as three positive finite floats, else InputError naming ``what`` (a file or an option)."""
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise InputError(f"{what}: spacing must be three positive finite numbers (x, y, z mm), got {values}")
    return values


def check_scan_for_spacing(geometry: Geometry, target: Sequence[float], path: str | os.PathLike) -> None:
    """Refuse a scan the spacing-based path cannot use: an InputError naming ``path`` and the problem.

    A spacing that is zero, negative or NaN; a single slice or single row (a 2-D image stored in a 3-D
    file); a spacing more than :data:`MAX_SPACING_RATIO` times the target along an axis (a localiser).
    """
    check_spacing(geometry.spacing, str(path))
    if min(geometry.size) < 2:
        raise InputError(f"{path}: is a 2-D image (size {geometry.size}); expected a 3-D volume")
    ratios = np.asarray(geometry.spacing) / np.asarray(target)
    axis = int(np.argmax(ratios))
    if ratios[axis] > MAX_SPACING_RATIO:
        raise InputError(f"{path}: spacing {geometry.spacing[axis]:g} mm along {'xyz'[axis]} is "
                         f"{ratios[axis]:.0f}x the target {target[axis]:g} mm (a localiser or thick reformat?); "
                         f"at most {MAX_SPACING_RATIO:g}x is accepted")


def read_geometry(path: Path) -> Geometry:
    """The geometry of a scan file from its header alone (a DICOM series folder is read whole).

    Raises:
        InputError: naming the file, as :func:`skcdf.data.preprocess.read_scan` (which reads it to say why).
    """
    if not path.is_dir():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            reader = None
        if reader is not None and reader.GetDimension() == 3:
            return Geometry(tuple(reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                            tuple(reader.GetDirection()), str(path))
    return Geometry.of_image(read_scan(path), source=path)


def network_size(geometry: Geometry, preprocessing: Mapping) -> tuple[int, int, int] | None:
    """The (D, H, W) grid a scan of ``geometry`` is predicted on: the checkpoint's ``size`` (fixed-size
    path), the size at its ``spacing`` (spacing-based path), or None (the scan's own grid)."""
    if preprocessing.get("spacing") is not None:
        return size_for_spacing(geometry, preprocessing["spacing"])
    size = preprocessing.get("size")
    return None if size is None else tuple(int(n) for n in size)
