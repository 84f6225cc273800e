"""Saving and loading checkpoints, and rebuilding a model from any checkpoint skcdf accepts.

Checkpoints are untrusted input: they are always read with ``torch.load(..., weights_only=True)``,
which refuses anything but tensors and plain containers, so loading one never runs code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import torch

from skcdf.nn import SKCDFNet
from skcdf.utils import InputError, atomic_path

#: Marks a checkpoint written by skcdf (training or ``import-reference``).
FORMAT = "skcdf-checkpoint"

#: Preprocessing of the reference implementation (SPEC §5): used for its checkpoints, and as defaults.
REFERENCE_PREPROCESSING: dict[str, Any] = {
    "size": [80, 160, 160], "window": [-75.0, 275.0], "patch_size": [64, 128, 128],
    "class_names": None, "class_abbrevs": None,
}


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """``torch.save`` the payload atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely (``weights_only=True``) onto the CPU.

    Raises:
        InputError: naming the file, when it is missing, unreadable, not a dict, or holds objects
            that a weights-only load refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: refused: the checkpoint holds objects other than tensors and plain "
                         f"containers, and checkpoints are loaded with weights_only=True ({exc})") from None
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        raise InputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise InputError(f"{path}: expected a dict of tensors, found {type(payload).__name__}")
    return payload


def resolve_checkpoint(path_or_run: str | Path) -> Path:
    """A checkpoint file as given, or a run folder's ``best.pt`` (else ``last.pt``)."""
    path = Path(path_or_run)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise InputError(f"{path}: run folder holds neither best.pt nor last.pt")
    return path


def load_model(path_or_run: str | Path, device: str | torch.device = "cpu", *,
               patch_size: Sequence[int] = (64, 128, 128), num_heads: int = 2) -> tuple[SKCDFNet, dict]:
    """Rebuild the model of any checkpoint skcdf accepts, in eval mode on ``device``.

    Accepts a run folder, an skcdf checkpoint (training or ``import-reference``), or a reference
    ``best_model.pth``; ``patch_size`` and ``num_heads`` apply to the latter only (its file does not
    record them).

    Returns:
        (model, preprocessing) where preprocessing holds ``size`` (the prepared (D, H, W) or None),
        ``window`` ([lo, hi] or None), ``patch_size``, ``class_names`` and ``class_abbrevs``.
    """
    from skcdf.compat import from_reference_state_dict

    path = resolve_checkpoint(path_or_run)
    payload = load_checkpoint(path)
    try:
        if payload.get("format") == FORMAT:
            model = SKCDFNet(**payload["model_args"])
            model.load_state_dict(payload["model"])
            preprocessing = {**REFERENCE_PREPROCESSING, **payload.get("preprocessing", {})}
        else:
            model = from_reference_state_dict(payload, patch_size=patch_size, num_heads=num_heads)
            preprocessing = {**REFERENCE_PREPROCESSING, "patch_size": list(patch_size)}
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise InputError(f"{path}: cannot build a model from this checkpoint: {exc}") from None
    return model.to(device).eval(), preprocessing
