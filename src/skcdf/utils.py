"""Small shared helpers: atomic file writes and the error type for bad input."""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator


class InputError(ValueError):
    """Bad user input (a file, a folder, a configuration). The message names the culprit and the problem."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on failure delete it.

    Nothing half-written is ever left under the final name. The temporary name keeps the final
    suffix(es) so that writers that pick a format from the extension (SimpleITK, numpy) still work.

    Example::

        with atomic_path("out/case.nii.gz") as tmp:
            sitk.WriteImage(image, str(tmp))
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes)
    # A fresh name, not a file: the writer creates it, so it gets the usual permissions (umask)
    # rather than mkstemp's owner-only 0600.
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp{suffix}"
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path, after checking that it can be (or already is) a folder to write into.

    Raises:
        InputError: ``path``, or a folder above it, exists and is not a folder.
    """
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "" if candidate == path else f" (so {path} cannot be created)"
                raise InputError(f"{candidate}: exists and is not a folder{what}; the output must be a folder")
            break
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
