"""Prediction from and to files: scan files, folders of scans, prepared data sets, DICOM series and
DICOMweb URLs in; ``<id>.nii.gz`` label maps out (uint8, written atomically; a DICOM series can also
get a DICOM SEG). One failing case never stops the others.

The numbers come from :mod:`skcdf.infer` (the sliding window over a volume or a scan); this module
finds the inputs, reads them, and writes the results. :func:`predict_path` takes whatever ``skcdf
predict`` is given.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from skcdf import dicom
from skcdf.data.geometry import Geometry, prepared_grid
from skcdf.data.layout import is_prepared_dataset, load_geometry, load_image, read_split
from skcdf.data.preprocess import read_image
from skcdf.data.sources import IMAGE_SUFFIXES, strip_suffix
from skcdf.dicomweb import is_dicomweb_url, predict_url
from skcdf.evaluation import evaluate_folders
from skcdf.infer import (InferenceSettings, Network, argmax_labels, labels_in_original_space, overlap_for_stride,
                         place, predict_image, volume_probabilities)
from skcdf.predict_series import predict_dicom_series, write_labels
from skcdf.utils import InputError, check_output_folder

__all__ = ["IMAGE_SUFFIXES", "CaseFailure", "PredictionSummary", "case_id_from_path", "predict_dataset",
           "predict_dicom_series", "predict_files", "predict_image_file", "predict_path"]


@dataclass(frozen=True)
class CaseFailure:
    """One case that could not be predicted: its file or case id and the error message."""

    source: str
    message: str


@dataclass
class PredictionSummary:
    """What a multi-case prediction produced: the files written and the cases that failed."""

    written: list[Path] = field(default_factory=list)
    failures: list[CaseFailure] = field(default_factory=list)


def case_id_from_path(path: str | Path) -> str:
    """The file name without its image extension(s): ``scans/case01.nii.gz`` -> ``case01``."""
    name = Path(path).name
    return strip_suffix(name) if name.lower().endswith(IMAGE_SUFFIXES) else Path(name).stem


def predict_image_file(
    model: Network,
    path: str | Path,
    output_dir: str | Path,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
) -> Path:
    """Predict one scan file (anything SimpleITK reads) and write ``output_dir/<id>.nii.gz``; see :func:`predict_image`.

    Raises:
        InputError: the file cannot be read as a 3D image (the message names it).
    """
    labels = predict_image(model, read_image(path), preprocessing, settings, source=str(path))
    return write_labels(labels, Path(output_dir) / f"{case_id_from_path(path)}.nii.gz")


def _for_each_case(cases: Sequence[str], predict_case: Callable[[str], list[Path]]) -> PredictionSummary:
    """Run ``predict_case`` on every case with a progress bar; an InputError fails that case only."""
    summary = PredictionSummary()
    for case in tqdm(cases, desc="predict", unit="case"):
        try:
            summary.written.extend(predict_case(case))
        except InputError as error:
            summary.failures.append(CaseFailure(case, str(error)))
            tqdm.write(f"error: {error}", file=sys.stderr)
    return summary


def predict_files(
    model: Network,
    paths: Iterable[str | Path],
    output_dir: str | Path,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
) -> PredictionSummary:
    """Predict each scan file into ``output_dir/<id>.nii.gz``; an unreadable file is reported, the rest still run.

    Raises:
        InputError: two inputs would write the same ``<id>.nii.gz``, or the stride does not fit the patch.
    """
    overlap_for_stride(preprocessing["patch_size"], settings.stride)  # a bad stride fails once, not per case
    paths = [str(path) for path in paths]
    first_path: dict[str, str] = {}
    for path in paths:
        case_id = case_id_from_path(path)
        if case_id in first_path:
            raise InputError(f"{first_path[case_id]} and {path} would both be written as {case_id}.nii.gz")
        first_path[case_id] = path
    return _for_each_case(paths, lambda path: [predict_image_file(model, path, output_dir, preprocessing, settings)])


def predict_dataset(
    model: Network,
    root: str | Path,
    output_dir: str | Path,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
    split: str = "test",
    original_space: bool = False,
) -> PredictionSummary:
    """Predict the cases of one split of a prepared data set.

    Each case is predicted on the prepared grid and written as ``output_dir/<case id>.nii.gz``, so
    that ``skcdf evaluate output_dir root`` compares it voxel by voxel with the prepared labels. With
    ``original_space``, the probabilities are also resampled to the original scan's grid (from the
    case's geometry json) and written as ``output_dir/original/<case id>.nii.gz``.

    Raises:
        InputError: the split is missing or names unknown cases, or the stride does not fit the patch. A case that cannot be read, or has no
            geometry json while ``original_space`` is asked for, is recorded in the summary instead.
    """
    overlap_for_stride(preprocessing["patch_size"], settings.stride)  # a bad stride fails once, not per case
    root, output_dir = Path(root), Path(output_dir)
    training_size = preprocessing.get("size")

    def predict_case(case_id: str) -> list[Path]:
        geometry = load_geometry(root, case_id)
        if original_space and geometry is None:
            raise InputError(f"{root}: case {case_id} has no geometry json, so it cannot be written in the original space")
        image = load_image(root, case_id)
        if training_size is not None and list(image.shape) != list(training_size):
            warnings.warn(f"{root}: prepared volumes are not of the training size {tuple(training_size)}; "
                          "predicting on the prepared grid as it is", stacklevel=2)
        probabilities = volume_probabilities(model, image, preprocessing, settings,
                                              None if geometry is None else geometry.direction)
        if geometry is None:  # unknown original scan: unit spacing at the origin
            prepared = Geometry(tuple(reversed(image.shape)), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
        else:
            prepared = prepared_grid(geometry, image.shape)
        labels = argmax_labels(probabilities)
        written = [write_labels(place(labels, prepared), output_dir / f"{case_id}.nii.gz")]
        if original_space:
            labels = labels_in_original_space(probabilities.cpu().numpy(), geometry)
            written.append(write_labels(place(labels, geometry), output_dir / "original" / f"{case_id}.nii.gz"))
        return written

    return _for_each_case(read_split(root, split), predict_case)


def predict_and_evaluate(model: Network, root: str | Path, predictions: str | Path, evaluation: str | Path,
                         preprocessing: Mapping, name: str, settings: InferenceSettings = InferenceSettings(),
                         split: str = "test") -> None:
    """Predict ``split`` of a prepared data set into ``predictions`` (:func:`predict_dataset`) and evaluate
    it against the prepared labels into ``evaluation``, titled ``name``. A case that could not be predicted
    is an error here: the evaluation would silently score fewer cases."""
    summary = predict_dataset(model, root, predictions, preprocessing, settings, split)
    if summary.failures:
        raise RuntimeError(f"{predictions}: prediction failed for {len(summary.failures)} case(s): {summary.failures}")
    evaluate_folders(predictions, root, evaluation, split=split, name=name)


def predict_path(
    model: Network,
    source: str | Path,
    output_dir: str | Path,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
    split: str = "test",
    original_space: bool = False,
    series_uid: str | None = None,
    dicom_seg: bool = False,
    store: bool = False,
) -> PredictionSummary:
    """Predict whatever ``source`` is: a prepared data set (see :func:`predict_dataset`), a folder of
    scan files (those ending in one of :data:`IMAGE_SUFFIXES`, not hidden, not recursive), a folder
    holding a DICOM series (see :func:`predict_dicom_series`), one scan file (see
    :func:`predict_files`), or the URL of a DICOMweb study or series (see
    :func:`skcdf.dicomweb.predict_url`). ``split`` and ``original_space`` apply to prepared data sets
    only, ``series_uid`` and ``dicom_seg`` to DICOM series and URLs only, ``store`` (send the SEG back
    with STOW-RS; implies ``dicom_seg``) to URLs only; scans are always written on their own grid.

    Raises:
        InputError: ``output_dir`` is a file; ``source`` does not exist, is a folder with neither a
            data set, scan files nor a DICOM series, or a DICOM option is given for another kind of
            input; for a DICOM series, any error of :func:`predict_dicom_series`; for a URL, any
            error of :func:`skcdf.dicomweb.predict_url`.
    """
    check_output_folder(output_dir)
    if is_dicomweb_url(source):
        overlap_for_stride(preprocessing["patch_size"], settings.stride)  # the usual message for a bad stride
        return PredictionSummary(written=predict_url(
            model, str(source), output_dir, preprocessing, settings, series_uid, dicom_seg, store))
    if store:
        raise InputError(f"{source}: --store needs the DICOMweb URL of a study or series as INPUT")
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.is_dir() and not is_prepared_dataset(source) and not _scan_files(source) and dicom.is_dicom_folder(source):
        overlap_for_stride(preprocessing["patch_size"], settings.stride)  # the usual message for a bad stride
        return PredictionSummary(
            written=predict_dicom_series(model, source, output_dir, preprocessing, settings, series_uid, dicom_seg))
    if series_uid is not None or dicom_seg:
        raise InputError(f"{source}: --series and --dicom-seg need a folder holding a DICOM series")
    if not source.is_dir():
        return predict_files(model, [source], output_dir, preprocessing, settings)
    if is_prepared_dataset(source):
        return predict_dataset(model, source, output_dir, preprocessing, settings, split, original_space)
    scans = _scan_files(source)
    if not scans:
        raise InputError(
            f"{source}: neither a prepared data set (<id>_image.npy files), a folder of scans "
            f"({', '.join(IMAGE_SUFFIXES)}) nor a DICOM series"
        )
    return predict_files(model, scans, output_dir, preprocessing, settings)


def _scan_files(folder: Path) -> list[Path]:
    """The scan files directly in ``folder``, sorted; hidden files (e.g. the temporary files of
    interrupted atomic writes) are left out."""
    return sorted(
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".") and path.name.lower().endswith(IMAGE_SUFFIXES)
    )
