"""``skcdf prepare``: a raw data set folder → the prepared layout (:mod:`skcdf.data.layout`).

Every case is read, checked (readable 3-D scalar volume, finite intensities, label values are class
indices, label on the image's grid), resampled to the fixed size over its own physical extent
(trilinear for the image, nearest for the label) and written with its original geometry. The work
happens in a staging folder beside OUT that becomes OUT by one rename when everything succeeded, so
a bad case stops the run with one message and leaves nothing behind.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal, Sequence

import SimpleITK as sitk

from skcdf.data.geometry import Geometry, resample_to_size
from skcdf.data.layout import dataset_info, staged_output_dir, write_case, write_dataset_info, write_split
from skcdf.parallel import map_cases
from skcdf.data.preprocess import check_same_grid, read_label, read_scan
from skcdf.data.sources import CaseSource, find_cases
from skcdf.data.splits import counts_from_fractions, make_splits, read_user_splits

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
    info = dataset_info(raw.name, raw.class_names, size, window, raw.modality, raw.class_abbrevs)
    with staged_output_dir(out, overwrite) as staging:
        job = functools.partial(_prepare_case, out=staging, size=tuple(size), num_classes=len(raw.class_names),
                                expect_ct=window is not None)
        map_cases(job, raw.cases, workers, desc="prepare")
        for name, ids in splits.items():
            write_split(staging, name, ids)
        write_dataset_info(staging, info)
    return out


def _prepare_case(case: CaseSource, out: Path, size: tuple[int, int, int], num_classes: int,
                  expect_ct: bool) -> None:
    """Read and check one case (an image file or a DICOM series folder, which must be CT when
    ``expect_ct``), resample it to ``size`` and write it into ``out``."""
    image = read_scan(case.image, expect_ct)
    label = None
    if case.label is not None:
        label = read_label(case.label, num_classes)
        check_same_grid(image, label, case.image, case.label)
        label = sitk.GetArrayFromImage(resample_to_size(label, size, is_label=True))
    write_case(out, case.case_id, sitk.GetArrayFromImage(resample_to_size(image, size, is_label=False)), label,
               Geometry.of_image(image, source=case.image.resolve()))
