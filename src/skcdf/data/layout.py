"""The prepared data set on disk (the "reference layout", SPEC §5): reading and writing it.

::

    ROOT/dataset.json              name, classes, prepared size, CT window, modality, lateral pairs (optional);
                                   spacing-based data sets: size null, spacing (x, y, z) and intensity statistics
    ROOT/npy/<id>_image.npy        float32 (D, H, W), intensities in HU (not windowed)
    ROOT/npy/<id>_label.npy        uint8 (D, H, W), values 0..K-1; absent for unlabeled-only cases
    ROOT/npy/<id>_geometry.json    the original scan's geometry, so predictions can be put back in it
    ROOT/splits/<name>.txt         one case id per line: train, eval, test, labeled_20p, unlabeled_20p, ...

A bare folder of the reference implementation is read too: no dataset.json (Synapse's classes and
window are assumed, with a warning), volumes in ``npy/``, in the folder itself or in one subfolder,
split files in ``splits/``, ``split_txts/`` or the folder itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from skcdf.data.classes import CT_WINDOW, SYNAPSE_ABBREVS, SYNAPSE_NAMES, abbreviate
from skcdf.data.geometry import Geometry
from skcdf.data.intensity import INTENSITY_KEYS
from skcdf.data.laterality import check_lateral_pairs
from skcdf.data.spacing import check_spacing
from skcdf.utils import InputError, atomic_path, atomic_write_text

_SPLIT_FOLDERS = ("splits", "split_txts", ".")


# ---------------------------------------------------------------------------------------------- reading


def read_dataset_info(root: str | os.PathLike) -> dict:
    """The data set's ``dataset.json`` (keys of INTERFACES.md), checked and completed.

    A bare reference-implementation folder without ``dataset.json`` gets Synapse's 14 classes and the
    CT window (-75, 275), with a warning. ``lateral_pairs`` is None unless dataset.json states the
    left/right class pairs (see :mod:`skcdf.data.laterality`).

    Raises:
        InputError: the folder is missing, or dataset.json is unreadable or inconsistent.
    """
    root = Path(root)
    path = root / "dataset.json"
    if not path.is_file():
        volume_dir(root)  # fails clearly when this is not a data set at all
        warnings.warn(f"{root}: no dataset.json; assuming Synapse's 14 classes and CT window {CT_WINDOW}", stacklevel=2)
        return {"name": root.name, "num_classes": len(SYNAPSE_NAMES), "class_names": list(SYNAPSE_NAMES),
                "class_abbrevs": list(SYNAPSE_ABBREVS), "size": None, "window": list(CT_WINDOW), "modality": "CT",
                "lateral_pairs": None}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    return _checked_info(info, path)


def _checked_info(info: object, path: Path) -> dict:
    if not isinstance(info, dict):
        raise InputError(f"{path}: expected a JSON object")
    names = info.get("class_names")
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise InputError(f"{path}: 'class_names' must list at least 2 class names (index 0 background)")
    num_classes = info.get("num_classes", len(names))
    if num_classes != len(names):
        raise InputError(f"{path}: num_classes {num_classes} but {len(names)} class_names")
    abbrevs = info.get("class_abbrevs") or abbreviate(names)
    if len(abbrevs) != len(names):
        raise InputError(f"{path}: {len(abbrevs)} class_abbrevs for {len(names)} class_names")
    window = info.get("window")
    if window is not None and (len(window) != 2 or not float(window[0]) < float(window[1])):
        raise InputError(f"{path}: 'window' must be null or [low, high] with low < high, not {window}")
    size = info.get("size")
    if size is not None and (len(size) != 3 or min(size) < 1):
        raise InputError(f"{path}: 'size' must be null or [D, H, W], not {size}")
    pairs = check_lateral_pairs(info.get("lateral_pairs"), len(names), path)
    spacing = info.get("spacing")
    if spacing is not None:
        spacing = list(check_spacing(spacing if isinstance(spacing, list) else [spacing], f"{path}: 'spacing'"))
    intensity = info.get("intensity")
    if intensity is not None and not (isinstance(intensity, dict) and set(INTENSITY_KEYS) <= set(intensity)):
        raise InputError(f"{path}: 'intensity' must be null or hold {', '.join(INTENSITY_KEYS)}")
    grid = {} if spacing is None else {"spacing": spacing, "intensity": intensity}  # the spacing-based path only
    return {"name": str(info.get("name", path.parent.name)), "num_classes": len(names), "class_names": names,
            "class_abbrevs": list(abbrevs), "size": None if size is None else [int(n) for n in size],
            "window": None if window is None else [float(w) for w in window],
            "modality": str(info.get("modality", "CT")),
            "lateral_pairs": None if pairs is None else [list(pair) for pair in pairs], **grid}


def volume_dir(root: str | os.PathLike) -> Path:
    """The folder that holds ``<id>_image.npy``: ``root/npy``, else ``root``, else its first subfolder that has them.

    Raises:
        InputError: ``root`` does not exist or no such folder is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: data set folder not found")
    if (root / "npy").is_dir():
        return root / "npy"
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if next(folder.glob("*_image.npy"), None) is not None:
            return folder
    raise InputError(f"{root}: no prepared volumes (<id>_image.npy) in npy/, in the folder or in a subfolder")


def is_prepared_dataset(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a prepared data set: :func:`volume_dir` finds its ``<id>_image.npy`` files."""
    try:
        volume_dir(folder)
    except InputError:
        return False
    return True


def list_cases(root: str | os.PathLike) -> list[str]:
    """Ids of all cases that have an image, sorted."""
    return sorted(p.name[: -len("_image.npy")] for p in volume_dir(root).glob("*_image.npy"))


def has_label(root: str | os.PathLike, case_id: str) -> bool:
    return (volume_dir(root) / f"{case_id}_label.npy").is_file()


def _split_path(root: Path, name: str) -> Path:
    name = name.removesuffix(".txt")
    candidates = [root / folder / f"{name}.txt" for folder in _SPLIT_FOLDERS]
    return next((p for p in candidates if p.is_file()), candidates[0])


def split_names(root: str | os.PathLike) -> list[str]:
    """Names of the split files found (``train``, ``labeled_20p``, ...)."""
    root = Path(root)
    for folder in _SPLIT_FOLDERS:
        names = sorted(p.stem for p in (root / folder).glob("*.txt"))
        if names:
            return names
    return []


def read_id_list(path: Path) -> list[str]:
    """Case ids of a split file: one a line, blank lines and surrounding spaces ignored."""
    try:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: split file not readable ({exc})") from None


def read_split(root: str | os.PathLike, name: str) -> list[str]:
    """Case ids of split ``name`` (``"train"``, ``"labeled_20p"``, ``"eval.txt"`` ...), in file order.

    Raises:
        InputError: the split file is missing or empty, or names a case with no image.
    """
    root = Path(root)
    path = _split_path(root, name)
    if not path.is_file():
        available = ", ".join(split_names(root)) or "none"
        raise InputError(f"{path}: split file not found (splits available: {available})")
    ids = read_id_list(path)
    if not ids:
        raise InputError(f"{path}: split file lists no case")
    folder = volume_dir(root)
    for case_id in ids:
        if not (folder / f"{case_id}_image.npy").is_file():
            raise InputError(f"{path}: names unknown case '{case_id}' (no {folder / f'{case_id}_image.npy'})")
    return ids


def read_npy(path: Path, mmap: bool = False) -> np.ndarray:
    """A 3-D (D, H, W) array from a .npy file (a read-only memory map with ``mmap``).

    Raises:
        InputError: naming the file, when it is missing, unreadable or not 3-D.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 3:
        raise InputError(f"{path}: has shape {array.shape}; expected a 3-D (D, H, W) volume")
    return array


def load_image(root: str | os.PathLike, case_id: str, mmap: bool = False) -> np.ndarray:
    """The case's image, float32 (D, H, W) in HU. With ``mmap`` a read-only memory map (if stored as float32)."""
    image = read_npy(volume_dir(root) / f"{case_id}_image.npy", mmap)
    return image if image.dtype == np.float32 else image.astype(np.float32)


def load_label(root: str | os.PathLike, case_id: str, mmap: bool = False) -> np.ndarray:
    """The case's label map, integer (D, H, W) with values 0..K-1 (uint8 as stored by skcdf).

    With ``mmap`` a read-only memory map (if stored as integers).
    """
    path = volume_dir(root) / f"{case_id}_label.npy"
    label = read_npy(path, mmap)
    if not np.issubdtype(label.dtype, np.integer):
        if not np.array_equal(label, np.round(label)):
            raise InputError(f"{path}: label has non-integer values")
        label = label.astype(np.int64)
    return label


def load_geometry(root: str | os.PathLike, case_id: str) -> Geometry | None:
    """The original scan geometry of the case, or None when the data set does not record it."""
    path = volume_dir(root) / f"{case_id}_geometry.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None
    return Geometry.from_json(data, path)


# ---------------------------------------------------------------------------------------------- writing


def dataset_info(name: str, class_names: Sequence[str], size: Sequence[int] | None,
                 window: Sequence[float] | None, modality: str = "CT",
                 class_abbrevs: Sequence[str] | None = None,
                 lateral_pairs: Sequence[Sequence[int]] | None = None) -> dict:
    """A ``dataset.json`` dictionary (keys of INTERFACES.md); ``lateral_pairs`` None: found from the names."""
    return {"name": name, "num_classes": len(class_names), "class_names": list(class_names),
            "class_abbrevs": list(class_abbrevs or abbreviate(class_names)),
            "size": None if size is None else [int(n) for n in size],
            "window": None if window is None else [float(w) for w in window], "modality": modality,
            "lateral_pairs": None if lateral_pairs is None else [[int(i), int(j)] for i, j in lateral_pairs]}


def write_dataset_info(root: str | os.PathLike, info: dict) -> None:
    atomic_write_text(Path(root) / "dataset.json", json.dumps(info, indent=2) + "\n")


def write_case(root: str | os.PathLike, case_id: str, image: np.ndarray, label: np.ndarray | None,
               geometry: Geometry | None) -> None:
    """Write ``npy/<id>_image.npy`` (float32), ``_label.npy`` (uint8, if given) and ``_geometry.json`` (if given)."""
    folder = Path(root) / "npy"
    _save_npy(folder / f"{case_id}_image.npy", np.asarray(image, dtype=np.float32))
    if label is not None:
        _save_npy(folder / f"{case_id}_label.npy", np.asarray(label, dtype=np.uint8))
    if geometry is not None:
        atomic_write_text(folder / f"{case_id}_geometry.json", json.dumps(geometry.to_json(), indent=2) + "\n")


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.save(file, array)


def write_split(root: str | os.PathLike, name: str, case_ids: Sequence[str]) -> None:
    atomic_write_text(Path(root) / "splits" / f"{name}.txt", "".join(f"{c}\n" for c in case_ids))


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``out``; on success it becomes ``out`` by one rename.

    On failure the staging folder is deleted, so ``out`` is never left half-written. An existing
    non-empty ``out`` is refused unless ``overwrite``, in which case it is replaced only on success.

    Raises:
        InputError: ``out`` exists, is not empty and ``overwrite`` is false; or it is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: already exists and is not empty; choose another folder or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it owner-only) so the data set gets the usual permissions
    staging = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    staging.mkdir()
    try:
        yield staging
        if out.exists():
            retired = out.parent / f".{out.name}.{uuid.uuid4().hex}.old"
            retired.mkdir()
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
