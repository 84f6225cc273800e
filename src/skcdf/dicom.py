"""DICOM in and out: a CT series from a folder, and label maps back as a DICOM Segmentation.

Reading uses SimpleITK's ``ImageSeriesReader`` with GDCM's series discovery, which also sorts the
slices by their position along the slice normal, so the order of the files on disk does not matter.
Before the pixels are read, the headers are checked with pydicom, because GDCM reads a stack with a
missing slice or mixed orientations without complaint (at most a warning) and the volume would be
silently wrong.

Writing uses highdicom: a binary Segmentation that references every source slice, one segment per
predicted class, with the class name, a SNOMED CT code where the class is a known Synapse/AMOS organ,
and the class's overlay colour of :mod:`skcdf.viz`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.colors import to_rgb
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from skcdf._version import __version__
from skcdf.utils import InputError, atomic_path
from skcdf.viz import organ_colour

__all__ = ["DicomSeries", "find_series", "is_dicom_folder", "organ_code", "read_segmentation", "read_series",
           "warn_series_choice", "write_segmentation"]

# Header differences below these are rounding in the writer, not a different geometry.
_ORIENTATION_TOLERANCE = 1e-4
_SPACING_TOLERANCE = 0.01  # relative, for pixel spacing and slice gaps


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series of a folder.

    Attributes:
        folder: the folder it was found in.
        series_uid: its SeriesInstanceUID.
        files: its slice files in slice order: ``files[k]`` is slice ``k`` along the image's D axis.
        modality: the Modality attribute (``"CT"``, ``"MR"``, ...).
        source: what messages call it: the folder, or the URL it was fetched from.
    """

    folder: Path
    series_uid: str
    files: tuple[Path, ...]
    modality: str
    source: str = ""

    @property
    def where(self) -> str:
        """``<source>: series <uid>``, the start of messages about this series."""
        return f"{self.source or self.folder}: series {self.series_uid}"


def find_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """The DICOM series directly in ``folder`` (not recursive), by SeriesInstanceUID, each with its
    files sorted by GDCM along the slice normal. Empty when there are none."""
    folder = str(folder)
    return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def is_dicom_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding at least one DICOM series."""
    return Path(path).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def read_series(folder: str | os.PathLike, series_uid: str | None = None,
                expect_ct: bool = False, source: str | None = None) -> tuple[sitk.Image, DicomSeries]:
    """Read one DICOM series of ``folder`` as a 3-D image in its own geometry.

    Args:
        folder: a folder holding the series' files (other files are ignored).
        series_uid: the series to read; default the one with the most slices.
        expect_ct: refuse a series whose Modality is not CT (the model windows Hounsfield units).
        source: what messages call the folder (default the folder itself), e.g. the URL it came from.

    Returns:
        ``(image, series)``: the image in the stored intensities after the rescale slope and
        intercept (HU for CT), with the series' spacing, origin and direction; and the series' files
        in the image's slice order.

    Raises:
        InputError: naming the folder, for: no series (or no series ``series_uid``); a non-CT
            modality when ``expect_ct``; slices with different orientations, pixel spacings or sizes;
            two slices at the same position, a missing slice, or uneven slice gaps.

    Warns:
        UserWarning: the folder holds several series and none is named: which one is read, and how
            to choose another (see :func:`warn_series_choice`).
    """
    folder = Path(folder)
    source = source or str(folder)
    if not folder.is_dir():
        raise InputError(f"{source}: no such folder")
    series = find_series(folder)
    if not series:
        raise InputError(f"{source}: no DICOM series found in this folder")
    if series_uid is None:
        series_uid = max(series, key=lambda uid: (len(series[uid]), uid))
        warn_series_choice(source, {uid: len(files) for uid, files in series.items()}, series_uid,
                           "choose another with --series UID (series_uid= in Python)")
    elif series_uid not in series:
        raise InputError(f"{source}: no series {series_uid}; the folder holds {', '.join(sorted(series))}")
    files = tuple(Path(f) for f in series[series_uid])
    headers = [_read_header(f) for f in files]
    modality = str(headers[0].get("Modality", ""))
    where = f"{source}: series {series_uid}"
    if expect_ct and modality != "CT":
        raise InputError(f"{where} has modality {modality or 'unknown'}, but the model expects CT "
                         "(it clips Hounsfield units to a CT window)")
    _check_stack(headers, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        reason = next((line.strip() for line in reversed(str(exc).splitlines()) if line.strip()), "unknown error")
        raise InputError(f"{where}: cannot be read ({reason[:200]})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{where}: has {image.GetNumberOfComponentsPerPixel()} values per voxel; expected grey levels")
    return image, DicomSeries(folder, series_uid, files, modality, source)


def warn_series_choice(where: str, slices: dict[str, int], chosen: str, how_to_choose: str) -> None:
    """Warn, when ``where`` holds more than one series, that ``chosen`` (the one with the most slices)
    is predicted, what the others are, and ``how_to_choose`` another; one line."""
    if len(slices) < 2:
        return
    others = ", ".join(f"{uid} ({slices[uid]} slices)" for uid in sorted(slices, key=lambda u: (-slices[u], u))
                       if uid != chosen)
    warnings.warn(f"{where} holds {len(slices)} series; predicting {chosen} ({slices[chosen]} slices), the one "
                  f"with the most slices; {how_to_choose}; the others: {others}", stacklevel=3)


def _read_header(path: Path) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{path}: not a readable DICOM file ({exc})") from None


def _check_stack(headers: Sequence[pydicom.Dataset], where: str) -> None:
    """Raise InputError unless the slices (in GDCM's order) form one regular grid."""
    try:
        orientations = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        pixel_spacings = np.array([[float(v) for v in h.PixelSpacing] for h in headers])
        sizes = {(int(h.Rows), int(h.Columns)) for h in headers}
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: a slice lacks its geometry (orientation, position, pixel spacing or size): {exc}") from None
    if not np.allclose(orientations, orientations[0], atol=_ORIENTATION_TOLERANCE):
        raise InputError(f"{where}: slices have different orientations (ImageOrientationPatient)")
    if not np.allclose(pixel_spacings, pixel_spacings[0], rtol=_SPACING_TOLERANCE):
        raise InputError(f"{where}: slices have different pixel spacings (PixelSpacing)")
    if len(sizes) > 1:
        raise InputError(f"{where}: slices have different sizes (Rows, Columns): {sorted(sizes)}")
    if len(headers) < 3:
        return  # one gap or none: nothing to compare
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    gaps = np.diff(positions @ normal)
    step = float(np.median(np.abs(gaps)))
    if step < 1e-6 or np.any(np.abs(gaps) < 1e-6):
        raise InputError(f"{where}: two slices lie at the same position (ImagePositionPatient)")
    uneven = np.flatnonzero(np.abs(np.abs(gaps) - step) > _SPACING_TOLERANCE * step)
    if uneven.size == 0:
        return
    first = int(uneven[0])
    ratio = abs(gaps[first]) / step
    if round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.1:
        raise InputError(f"{where}: {round(ratio) - 1} slice(s) missing between slices {first} and {first + 1} "
                         f"of {len(headers)} (gap {abs(gaps[first]):.3g} mm where the others are {step:.3g} mm)")
    raise InputError(f"{where}: uneven slice spacing: gap {abs(gaps[first]):.3g} mm between slices {first} and "
                     f"{first + 1}, where most are {step:.3g} mm")


# ------------------------------------------------------------------------------------------- SEG out

# Class names of the Synapse and AMOS label sets (lower case) -> (pydicom's SNOMED CT concept name, laterality).
# Classes left out have no single SNOMED CT concept ("portal and splenic veins", "prostate/uterus").
_ORGAN_CONCEPTS: dict[str, tuple[str, str | None]] = {
    "spleen": ("Spleen", None), "right kidney": ("Kidney", "Right"), "left kidney": ("Kidney", "Left"),
    "gallbladder": ("Gallbladder", None), "esophagus": ("Esophagus", None), "liver": ("Liver", None),
    "stomach": ("Stomach", None), "aorta": ("Aorta", None), "inferior vena cava": ("InferiorVenaCava", None),
    "postcava": ("InferiorVenaCava", None), "pancreas": ("Pancreas", None),
    "right adrenal gland": ("AdrenalGland", "Right"), "left adrenal gland": ("AdrenalGland", "Left"),
    "duodenum": ("Duodenum", None), "bladder": ("Bladder", None),
}


def organ_code(class_name: str) -> tuple[Code | None, Code | None]:
    """The SNOMED CT code of a Synapse/AMOS organ name and its laterality modifier; ``(None, None)``
    for a class without one."""
    concept = _ORGAN_CONCEPTS.get(class_name.strip().lower())
    if concept is None:
        return None, None
    organ, side = concept
    return getattr(codes.SCT, organ), None if side is None else getattr(codes.SCT, side)


def _segment_description(number: int, label: int, class_name: str) -> hd.seg.SegmentDescription:
    """highdicom's description of segment ``number``, which holds class ``label`` named ``class_name``."""
    code, laterality = organ_code(class_name)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=class_name[:64],  # a DICOM LO value holds 64 characters
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=code or codes.SCT.AnatomicalStructure,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="SKCDF", family=codes.cid7162.ArtificialIntelligence, version=__version__),
        display_color=hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in to_rgb(organ_colour(label)))),
    )
    if laterality is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(laterality)]
    return description


def write_segmentation(labels: np.ndarray, series: DicomSeries, class_names: Sequence[str],
                       path: str | os.PathLike) -> Path | None:
    """Write ``labels`` as a DICOM Segmentation of ``series`` (atomically).

    Args:
        labels: ``(D, H, W)`` integer class indices on the series' grid, slice ``k`` being
            ``series.files[k]`` (as returned by :func:`read_series`).
        series: the source series; the SEG references each of its slices and joins its study.
        class_names: names by class index (0 = background, never a segment).
        path: the file to write (e.g. ``out/case.seg.dcm``).

    Returns:
        ``path``, or None (with a warning) when no class is predicted: a SEG needs at least one segment.
    """
    labels = np.asarray(labels)
    present = [int(v) for v in np.unique(labels) if v != 0]
    if not present:
        warnings.warn(f"{series.where}: no organ predicted, so no DICOM SEG written", stacklevel=2)
        return None
    if present[-1] >= len(class_names):
        raise ValueError(f"label {present[-1]} has no class name (only {len(class_names)} classes)")
    if labels.shape[0] != len(series.files):
        raise ValueError(f"labels have {labels.shape[0]} slices, the series {len(series.files)}")
    # Segment numbers must run 1..n, so classes present are renumbered in order; the segment label keeps the name.
    segment_of_class = np.zeros(max(present) + 1, np.uint8)
    segment_of_class[present] = np.arange(1, len(present) + 1)
    sources = _seg_sources(series)
    try:
        descriptions = [_segment_description(n, c, class_names[c]) for n, c in enumerate(present, start=1)]
        segmentation = _segmentation(segment_of_class[labels], descriptions, sources)
    except (AttributeError, TypeError, ValueError) as exc:  # highdicom's checks of the source headers
        raise InputError(f"{series.where}: no DICOM SEG can be made of it ({exc})") from None
    path = Path(path)
    with atomic_path(path) as tmp:
        segmentation.save_as(tmp)
    return path


def _seg_sources(series: DicomSeries) -> list[pydicom.Dataset]:
    """The source headers for highdicom, checked for what a SEG of them needs.

    A missing FrameOfReferenceUID cannot be made up (the SEG would claim a frame the images do not
    have), so it is refused; a missing SliceThickness is taken as the gap between slice positions,
    which is what a SEG's slice thickness describes for a stack of contiguous segmentation planes.

    Raises:
        InputError: the series has no FrameOfReferenceUID.
    """
    sources = [_read_header(f) for f in series.files]
    if not all(h.get("FrameOfReferenceUID") for h in sources):
        raise InputError(f"{series.where} has no FrameOfReferenceUID (an anonymiser may have removed it), "
                         "which a DICOM SEG of CT images needs")
    if not all(h.get("SliceThickness") for h in sources):
        thickness = _slice_gap(sources)
        for header in sources:
            if not header.get("SliceThickness"):
                header.SliceThickness = pydicom.valuerep.format_number_as_ds(thickness) if thickness else 1.0
    return sources


def _slice_gap(headers: Sequence[pydicom.Dataset]) -> float | None:
    """The median distance between consecutive slices along the slice normal; None for one slice."""
    if len(headers) < 2:
        return None
    orientation = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers]) @ normal
    return float(np.median(np.abs(np.diff(positions))))


def _segmentation(segments: np.ndarray, descriptions: list[hd.seg.SegmentDescription],
                  sources: list[pydicom.Dataset]) -> hd.seg.Segmentation:
    """highdicom's binary Segmentation of ``segments`` (``(D, H, W)`` segment numbers) on ``sources``."""
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=segments,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="skcdf",
        manufacturer_model_name="SKCDF",
        software_versions=__version__,
        device_serial_number="none",
        content_label="SKCDF",
        series_description="SKCDF segmentation",
    )


def read_segmentation(path: str | os.PathLike, series: DicomSeries, class_names: Sequence[str]) -> np.ndarray:
    """Read a DICOM Segmentation of ``series`` back into a ``(D, H, W)`` uint8 label map, segments
    mapped to class indices by their label (the class name), slice ``k`` being ``series.files[k]``.

    Raises:
        InputError: the file is not a readable SEG, or a segment's label is not one of ``class_names``.
    """
    path = Path(path)
    try:
        segmentation = hd.seg.segread(path)
    except Exception as exc:  # pydicom and highdicom raise many types for a foreign file
        raise InputError(f"{path}: not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from None
    index = {name[:64]: k for k, name in enumerate(class_names)}
    numbers = segmentation.get_segment_numbers()
    class_of_segment = np.zeros(max(numbers) + 1, np.uint8)
    for number in numbers:
        name = segmentation.get_segment_description(number).segment_label
        if name not in index:
            raise InputError(f"{path}: segment {number} is {name!r}, not one of the model's classes")
        class_of_segment[number] = index[name]
    uids = [str(_read_header(f).SOPInstanceUID) for f in series.files]
    segments = segmentation.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    return class_of_segment[segments]
