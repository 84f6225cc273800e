"""Finding the cases of a raw data set folder: Synapse, AMOS, or a generic nnU-Net-style folder.

Only file names are looked at here (and dataset.json); reading and checking the volumes is
:mod:`skcdf.data.prepare`'s job. An image without a label file is an unlabeled-only case.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from skcdf.data.classes import AMOS_ABBREVS, AMOS_NAMES, CT_WINDOW, SYNAPSE_ABBREVS, SYNAPSE_NAMES, abbreviate
from skcdf.data.splits import AMOS_SPLIT, SYNAPSE_SPLIT
from skcdf.utils import InputError

# Formats SimpleITK reads that hold a whole 3-D volume in one file (or a header naming its data file).
# File endings of the scan formats read through SimpleITK (longest first: ".nii.gz" before ".nii").
IMAGE_SUFFIXES = (".nii.gz", ".gipl.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".gipl", ".hdr")

LAYOUTS = ("synapse", "amos", "nifti")

# AMOS numbers its CT scans up to 500 and its MRI scans above.
_AMOS_LAST_CT = 500


@dataclass(frozen=True)
class CaseSource:
    """One case of a raw data set: its image file and, if labeled, its label file."""

    case_id: str
    image: Path
    label: Path | None


@dataclass
class RawDataset:
    """A raw data set's cases, classes and default preparation settings."""

    name: str
    class_names: list[str]
    class_abbrevs: list[str]
    window: tuple[float, float] | None
    modality: str
    cases: list[CaseSource]
    split_counts: tuple[int, int, int] | None = None  # exact (train, eval, test) numbers, else ...
    split_fractions: tuple[float, float, float] = field(default=SYNAPSE_SPLIT)  # ... these proportions
    labeled_percent: float = 20.0


def volume_files(folder: Path) -> list[Path]:
    """The volume files directly in ``folder`` (sorted); none if the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))


def strip_suffix(name: str) -> str:
    """``"img0001.nii.gz"`` → ``"img0001"``."""
    suffix = next(s for s in IMAGE_SUFFIXES if name.lower().endswith(s))
    return name[: -len(suffix)]


def _nifti_images(folder: Path) -> list[tuple[str, Path]]:
    """(stem, path) of the images directly in ``folder``, sorted: volume files, and subfolders (not
    hidden), each taken to hold one case's DICOM series."""
    images = [(strip_suffix(p.name), p) for p in volume_files(folder)]
    if folder.is_dir():
        images += [(p.name, p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(images)


def _find_by_stem(folder: Path, stem: str) -> Path | None:
    return next((p for p in volume_files(folder) if strip_suffix(p.name) == stem), None)


def _require_cases(src: Path, cases: list[CaseSource], expected: str) -> None:
    """Raise InputError for a missing or empty source folder, or two files giving the same case id."""
    if not src.is_dir():
        raise InputError(f"{src}: source folder not found")
    if not cases:
        raise InputError(f"{src}: no images found (expected {expected})")
    seen: dict[str, Path] = {}
    for case in cases:
        if case.case_id in seen:
            raise InputError(f"{case.image}: case id '{case.case_id}' is also that of {seen[case.case_id]}")
        seen[case.case_id] = case.image


def find_synapse(src: str | Path) -> RawDataset:
    """Synapse/BTCV: ``img/imgXXXX.nii.gz`` with ``label/labelXXXX.nii.gz``, in SRC or SRC/Training.

    Case ids are the numbers (``0001``), as in the reference implementation.
    """
    src = Path(src)
    root = src / "Training" if not (src / "img").is_dir() and (src / "Training" / "img").is_dir() else src
    cases = []
    for image in volume_files(root / "img"):
        number = re.sub(r"^img", "", strip_suffix(image.name))
        cases.append(CaseSource(number, image, _find_by_stem(root / "label", f"label{number}")))
    _require_cases(src, cases, "img/imgXXXX.nii.gz and label/labelXXXX.nii.gz")
    return RawDataset("Synapse", list(SYNAPSE_NAMES), list(SYNAPSE_ABBREVS), CT_WINDOW, "CT", cases,
                      split_counts=SYNAPSE_SPLIT, labeled_percent=20.0)


def find_amos(src: str | Path, include_mri: bool = False) -> RawDataset:
    """AMOS 2022: ``images{Tr,Va,Ts}/amos_XXXX.nii.gz`` with ``labels{Tr,Va,Ts}/``; CT only unless ``include_mri``.

    With MRI included there is no common intensity window, so none is used.
    """
    src = Path(src)
    cases = []
    for tag in ("Tr", "Va", "Ts"):
        for image in volume_files(src / f"images{tag}"):
            case_id = strip_suffix(image.name)
            number = re.search(r"(\d+)$", case_id)
            if number and int(number.group(1)) > _AMOS_LAST_CT and not include_mri:
                continue
            cases.append(CaseSource(case_id, image, _find_by_stem(src / f"labels{tag}", case_id)))
    _require_cases(src, cases, "imagesTr/amos_XXXX.nii.gz and labelsTr/amos_XXXX.nii.gz")
    names = _names_from_dataset_json(src) or list(AMOS_NAMES)
    abbrevs = list(AMOS_ABBREVS) if len(names) == len(AMOS_ABBREVS) else abbreviate(names)
    window, modality = (None, "CT+MRI") if include_mri else (CT_WINDOW, "CT")
    return RawDataset("AMOS", names, abbrevs, window, modality, cases,
                      split_fractions=AMOS_SPLIT, labeled_percent=5.0)


def find_nifti(src: str | Path, num_classes: int | None = None) -> RawDataset:
    """A generic nnU-Net-style folder: ``imagesTr/<case>_0000.<ext>``, ``labelsTr/<case>.<ext>``,
    ``imagesTs/`` (and ``labelsTs/`` if any), ``dataset.json`` with label names and modality.

    In place of an image file, ``imagesTr/<case>/`` (or ``<case>_0000/``) may be a folder holding the
    case's DICOM series; it is read (and checked) when the case is prepared.

    Only channel ``_0000`` is used. Class names come from dataset.json's ``labels`` (nnU-Net v1
    ``{"0": "background"}`` or v2 ``{"background": 0}``), else ``num_classes`` generic names.
    The CT window is used when dataset.json names the modality CT or names none.

    Raises:
        InputError: no images; neither label names nor ``num_classes``.
    """
    src = Path(src)
    cases, other_channels = [], 0
    for tag in ("Tr", "Ts"):
        for stem, image in _nifti_images(src / f"images{tag}"):
            channel = re.search(r"_(\d{4})$", stem)
            if channel and channel.group(1) != "0000":
                other_channels += 1
                continue
            case_id = stem[: channel.start()] if channel else stem
            cases.append(CaseSource(case_id, image, _find_by_stem(src / f"labels{tag}", case_id)))
    _require_cases(src, cases, "imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz")
    if other_channels:
        warnings.warn(f"{src}: only channel _0000 is used; {other_channels} other channel files ignored", stacklevel=2)
    info = _read_json(src / "dataset.json")
    names = _names_from_dataset_json(src)
    if names is None:
        if num_classes is None:
            raise InputError(f"{src / 'dataset.json'}: no 'labels' with class names; give the number of classes "
                             "(--num-classes K, background included)")
        names = ["background"] + [f"class {k}" for k in range(1, num_classes)]
    modality = _modality(info)
    window = CT_WINDOW if modality.upper() == "CT" else None
    return RawDataset(str(info.get("name", src.name)), names, abbreviate(names), window, modality, cases)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    return data


def _names_from_dataset_json(src: Path) -> list[str] | None:
    """Class names by label value from dataset.json's ``labels`` (either nnU-Net version), or None."""
    path = src / "dataset.json"
    labels = _read_json(path).get("labels")
    if not labels:
        return None
    try:
        if all(str(key).isdigit() for key in labels):  # v1: {"0": "background", ...}
            by_value = {int(k): str(v) for k, v in labels.items()}
        else:  # v2: {"background": 0, ...}
            by_value = {int(v): str(k) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise InputError(f"{path}: 'labels' must map label values to names (or names to values)") from None
    if sorted(by_value) != list(range(len(by_value))):
        raise InputError(f"{path}: label values {sorted(by_value)} are not 0..K-1")
    return [by_value[k] for k in range(len(by_value))]


def _modality(info: dict) -> str:
    channels = info.get("channel_names") or info.get("modality") or {"0": "CT"}
    if isinstance(channels, dict):
        return str(channels.get("0", next(iter(channels.values()), "CT")))
    return str(channels)


def find_cases(layout: str, src: str | Path, *, include_mri: bool = False,
               num_classes: int | None = None) -> RawDataset:
    """Dispatch to :func:`find_synapse`, :func:`find_amos` or :func:`find_nifti` by ``layout``."""
    if layout == "synapse":
        return find_synapse(src)
    if layout == "amos":
        return find_amos(src, include_mri)
    if layout == "nifti":
        return find_nifti(src, num_classes)
    raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")

