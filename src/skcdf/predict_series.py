"""Predicting a DICOM series folder (its labels as NIfTI, optionally a DICOM SEG), and writing label files.

Its own module so that :mod:`skcdf.dicomweb` (which predicts a fetched series as a folder) and
:mod:`skcdf.predict` (which dispatches DICOMweb URLs to :mod:`skcdf.dicomweb`) do not import each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import SimpleITK as sitk

from skcdf import dicom
from skcdf.data.classes import SYNAPSE_NAMES
from skcdf.data.geometry import Geometry
from skcdf.infer import InferenceSettings, Network, place, predict_scan
from skcdf.utils import InputError, atomic_path

__all__ = ["predict_dicom_series", "write_labels"]


def write_labels(image: sitk.Image, path: Path) -> Path:
    """Write ``image`` to ``path`` (compressed, atomically: nothing half-written under the name); returns ``path``."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    return path


def predict_dicom_series(
    model: Network,
    folder: str | Path,
    output_dir: str | Path,
    preprocessing: Mapping,
    settings: InferenceSettings = InferenceSettings(),
    series_uid: str | None = None,
    dicom_seg: bool = False,
    source: str | None = None,
) -> list[Path]:
    """Predict the DICOM series in ``folder`` (the one with the most slices, or ``series_uid``) and
    write ``output_dir/<folder name>.nii.gz`` on the series' grid; with ``dicom_seg`` also
    ``output_dir/<folder name>.seg.dcm``, a DICOM Segmentation referencing the series (see
    :func:`skcdf.dicom.write_segmentation`). ``source`` is what messages call the folder (default
    the folder), e.g. the DICOMweb URL it was fetched from.

    A checkpoint with a CT window only accepts CT series.

    Raises:
        InputError: naming the folder: no series, a non-CT series, or slices that do not form one
            regular grid (see :func:`skcdf.dicom.read_series`), before anything is written; or, after
            the NIfTI labels are written (the message says so), a series of which no SEG can be made
            (e.g. without FrameOfReferenceUID).
    """
    image, series = dicom.read_series(folder, series_uid, expect_ct=preprocessing.get("window") is not None,
                                      source=source)
    labels = predict_scan(model, image, preprocessing, settings, source=source or str(folder)).labels
    case_id = Path(folder).resolve().name
    written = [write_labels(place(labels, Geometry.of_image(image)), Path(output_dir) / f"{case_id}.nii.gz")]
    if dicom_seg:
        names = preprocessing.get("class_names") or SYNAPSE_NAMES  # a reference checkpoint is Synapse's
        try:
            seg = dicom.write_segmentation(labels, series, names, Path(output_dir) / f"{case_id}.seg.dcm")
        except InputError as error:
            raise InputError(f"{error}: no DICOM SEG written; the labels were written to {written[0]}") from None
        written += [seg] if seg is not None else []
    return written
