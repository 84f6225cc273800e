"""``skcdf prepare``: a raw data set folder → the prepared layout (:mod:`skcdf.data.layout`).

Every case is read, checked (readable 3-D scalar volume, finite intensities, label values are class
indices, label on the image's grid), resampled to the fixed size over its own physical extent
(trilinear for the image, nearest for the label) and written with its original geometry. The work
happens in a staging folder beside OUT that becomes OUT by one rename when everything succeeded, so
a bad case stops the run with one message and leaves nothing behind.

With ``spacing`` (issue 27) every case is instead resampled to one voxel spacing and keeps its own
size (:mod:`skcdf.data.spacing`); dataset.json then records the spacing (``size`` null) and the
training cases' foreground intensity statistics (:mod:`skcdf.data.intensity`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import SimpleITK as sitk

from skcdf.data.geometry import Geometry, resample_to_size
from skcdf.data.intensity import foreground_sample, intensity_statistics
from skcdf.data.layout import dataset_info, staged_output_dir, write_case, write_dataset_info, write_split
from skcdf.parallel import map_cases
from skcdf.data.preprocess import check_same_grid, read_label, read_scan
from skcdf.data.sources import CaseSource, RawDataset, find_cases
from skcdf.data.spacing import check_scan_for_spacing, check_spacing, read_geometry, size_for_spacing, target_spacing
from skcdf.data.splits import counts_from_fractions, make_splits, read_user_splits
from skcdf.utils import InputError

# The reference implementation's prepared size: 1.25 × the 64×128×128 training patch (SPEC §5).
DEFAULT_SIZE = (80, 160, 160)


def prepare_dataset(
    layout: str,
    src: str | Path,
    out: str | Path,
    *,
    size: Sequence[int] = DEFAULT_SIZE,
    labeled_percent: float | None = None,
    seed: int = 0,
    splits_dir: str | Path | None = None,
    split_counts: Sequence[int] | None = None,
    split_fractions: Sequence[float] | None = None,
    window: Sequence[float] | None | Literal["default"] = "default",
    include_mri: bool = False,
    num_classes: int | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    spacing: Sequence[float] | Literal["auto"] | None = None,
) -> Path:
    """Prepare the raw data set ``src`` (layout ``"synapse"``, ``"amos"`` or ``"nifti"``) into ``out``.

    Args:
        size: prepared (D, H, W).
        labeled_percent: share of training cases kept labeled (default: the layout's, Synapse 20, AMOS 5, nifti 20).
        seed: seeds the splits.
        splits_dir: existing split files to use instead of drawing new ones (see :func:`read_user_splits`).
        split_counts: (train, eval, test) numbers of labeled cases; or ``split_fractions``: their
            proportions. Default: Synapse 20/4/6 exactly, AMOS 216/24/120 scaled to the number of
            cases, nifti Synapse's proportions.
        window: CT window written to dataset.json; "default" takes the layout's (CT: (-75, 275), MRI: None).
        include_mri: AMOS only: also take the MRI scans (ids above 500).
        num_classes: nifti only, when dataset.json has no label names.
        workers: processes (None: one per core).
        overwrite: replace a non-empty ``out`` (only once everything succeeded).
        spacing: None: resample to ``size`` (the paper's protocol). ``"auto"`` (nnU-Net's rule over
            the training cases, :func:`~skcdf.data.spacing.target_spacing`) or (x, y, z) mm: resample
            to that spacing, each case keeping its own extent (``size`` is then not used).
    Returns:
        ``out``.
    Raises:
        InputError: bad source data or options (one message naming the file and the problem).
    """
    src, out = Path(src), Path(out)
    raw = find_cases(layout, src, include_mri=include_mri, num_classes=num_classes)
    percent = raw.labeled_percent if labeled_percent is None else labeled_percent
    if splits_dir is not None:
        splits = read_user_splits(splits_dir, {c.case_id: c.label is not None for c in raw.cases}, percent, seed)
    else:
        labeled = [c.case_id for c in raw.cases if c.label is not None]
        unlabeled_only = [c.case_id for c in raw.cases if c.label is None]
        if split_counts is None and split_fractions is None and raw.split_counts is not None:
            split_counts = raw.split_counts
        counts = split_counts or counts_from_fractions(len(labeled), split_fractions or raw.split_fractions)
        splits = make_splits(labeled, unlabeled_only, counts, percent, seed, source=str(src))
    window = raw.window if window == "default" else window
    target = None if spacing is None else _target_spacing(spacing, raw, splits, src, workers)
    info = dataset_info(raw.name, raw.class_names, size if target is None else None, window, raw.modality,
                        raw.class_abbrevs)
    grid = functools.partial(_fixed_size, size=tuple(size)) if target is None else \
        functools.partial(size_for_spacing, spacing=target)
    with staged_output_dir(out, overwrite) as staging:
        job = functools.partial(_prepare_case, out=staging, grid=grid, num_classes=len(raw.class_names),
                                expect_ct=window is not None, target=target)
        results = map_cases(job, raw.cases, workers, desc="prepare")
        if target is not None:
            info.update(spacing=list(target), **_spacing_path_info(raw, splits, results, src))
        for name, ids in splits.items():
            write_split(staging, name, ids)
        write_dataset_info(staging, info)
    return out


def _fixed_size(geometry: Geometry, size: tuple[int, int, int]) -> tuple[int, int, int]:
    return size


def _target_spacing(spacing: Sequence[float] | str, raw: RawDataset, splits: dict[str, list[str]], src: Path,
                    workers: int | None) -> tuple[float, float, float]:
    """The spacing option resolved: given (checked), or ``"auto"``: nnU-Net's rule over every case not in
    eval or test (their headers only; DICOM series are read whole). Refuses a data set mixing CT and MRI."""
    if "+" in raw.modality:  # AMOS with --include-mri: "CT+MRI"
        raise InputError(f"{src}: modality {raw.modality!r}: one spacing and intensity normalisation cannot serve "
                         "a data set mixing CT and MRI; prepare them separately")
    if spacing != "auto":
        return check_spacing(spacing, "--spacing")
    held_out = set(splits.get("eval", [])) | set(splits.get("test", []))
    geometries = map_cases(read_geometry, [c.image for c in raw.cases if c.case_id not in held_out], workers,
                           desc="spacing")
    return target_spacing([g.spacing for g in geometries], [g.size for g in geometries])


def _spacing_path_info(raw: RawDataset, splits: dict[str, list[str]], results: list, src: Path) -> dict:
    """dataset.json's ``intensity`` (from the labeled training cases: splits ``labeled_*``) and
    ``modality`` (the DICOM series' one where known), after checking that no two series' modalities differ."""
    modalities = {modality: case for case, (modality, _) in zip(raw.cases, results) if modality}
    if len(modalities) > 1:
        shown = ", ".join(f"{case.image} is {modality}" for modality, case in modalities.items())
        raise InputError(f"{src}: the data set mixes modalities ({shown}); prepare them separately")
    labeled = {case for name, ids in splits.items() if name.startswith("labeled_") for case in ids}
    samples = [sample for case, (_, sample) in zip(raw.cases, results)
               if case.case_id in labeled and sample is not None]
    return {"intensity": intensity_statistics(samples, str(src)),
            "modality": next(iter(modalities), raw.modality)}


def _prepare_case(case: CaseSource, out: Path, grid: Callable[[Geometry], tuple[int, int, int]], num_classes: int,
                  expect_ct: bool, target: tuple[float, float, float] | None) -> tuple[str | None, np.ndarray | None]:
    """Read and check one case (an image file or a DICOM series folder, which must be CT when
    ``expect_ct``), resample it to the (D, H, W) size ``grid`` gives for its geometry and write it into
    ``out``. On the spacing path (``target``: the spacing) the scan is also checked against the target
    (:func:`~skcdf.data.spacing.check_scan_for_spacing`) and a sample of its foreground intensities kept.

    Returns:
        the DICOM series' modality (None for a file) and the foreground sample (None off the spacing path
        or without label).
    """
    if case.image.is_dir():
        from skcdf.dicom import read_series  # here, as in read_scan: highdicom loads only for DICOM folders

        image, series = read_series(case.image, expect_ct=expect_ct)
        modality = series.modality
    else:
        image, modality = read_scan(case.image, expect_ct), None
    geometry = Geometry.of_image(image, source=case.image.resolve())
    if target is not None:
        check_scan_for_spacing(geometry, target, case.image)
    size = grid(geometry)
    label = sample = None
    if case.label is not None:
        label = read_label(case.label, num_classes)
        check_same_grid(image, label, case.image, case.label)
        if target is not None:
            sample = foreground_sample(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(label),
                                       case.case_id)
        label = sitk.GetArrayFromImage(resample_to_size(label, size, is_label=True))
    write_case(out, case.case_id, sitk.GetArrayFromImage(resample_to_size(image, size, is_label=False)), label,
               geometry)
    return modality, sample
