"""Saving and loading checkpoints, and rebuilding a model from any checkpoint skcdf accepts.

Checkpoints are untrusted input: they are always read with ``torch.load(..., weights_only=True)``,
which refuses anything but tensors and plain containers, so loading one never runs code.
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Sequence

import torch
from torch import nn

from skcdf.compat import from_reference_state_dict
from skcdf.methods.plugin import build_network
from skcdf.utils import InputError, atomic_path

#: Marks a checkpoint written by skcdf (training or ``import-reference``).
FORMAT = "skcdf-checkpoint"

#: Preprocessing of the reference implementation (SPEC §5): used for its checkpoints, and as defaults.
REFERENCE_PREPROCESSING: dict[str, Any] = {
    "size": [80, 160, 160], "window": [-75.0, 275.0], "patch_size": [64, 128, 128],
    "class_names": None, "class_abbrevs": None, "lateral_pairs": None, "flips": "reference",
}


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """``torch.save`` the payload atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def cpu_copy(payload: Any) -> Any:
    """A snapshot of ``payload`` with every tensor copied to the CPU (containers rebuilt, other values kept).

    The copy is what a background write may read while training goes on updating the originals in place.
    """
    if isinstance(payload, torch.Tensor):
        return payload.detach().to("cpu", copy=True)
    if isinstance(payload, dict):
        return {key: cpu_copy(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return type(payload)(cpu_copy(value) for value in payload)
    return payload


class CheckpointWriter:
    """Writes checkpoints on a background thread, so that training continues while the files are written.

    ``save`` snapshots the payload to the CPU on the calling thread (the only part that waits: a copy,
    not the serialisation and the disk), then writes each file atomically in the background. At most
    one write is in flight: ``save`` and ``wait`` first finish the previous one, and re-raise its error
    if it failed. Use it as a context manager so that the last write is finished before the run ends.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, payload: dict, paths: Sequence[str | Path]) -> None:
        """Write ``payload`` to every path in ``paths`` (e.g. last.pt and best.pt) in the background."""
        self.wait()
        if not paths:
            return
        snapshot = cpu_copy(payload)
        self._thread = threading.Thread(target=self._write, args=(snapshot, [Path(p) for p in paths]),
                                        name="skcdf-checkpoint-writer")
        self._thread.start()

    def _write(self, payload: dict, paths: list[Path]) -> None:
        try:
            for path in paths:
                save_checkpoint(path, payload)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the write in flight (if any) has finished; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Finish the last write. When the block already fails, its exception wins; a write error becomes a note."""
        if exc is None:
            self.wait()
            return
        try:
            self.wait()
        except Exception as write_error:
            exc.add_note(f"writing a checkpoint failed too: {write_error!r}")


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
               patch_size: Sequence[int] = (64, 128, 128), num_heads: int = 2) -> tuple[nn.Module, dict]:
    """Rebuild the model of any checkpoint skcdf accepts, in eval mode on ``device``: an SKCDFNet, or
    a Table 1 method's :class:`~skcdf.methods.plugin.MethodNet` (the same inference calls).

    Accepts a run folder, an skcdf checkpoint (training or ``import-reference``), or a reference
    ``best_model.pth``; ``patch_size`` and ``num_heads`` apply to the latter only (its file does not
    record them).

    Returns:
        (model, preprocessing) where preprocessing holds ``size`` (the prepared (D, H, W) or None),
        ``window`` ([lo, hi] or None), ``patch_size``, ``class_names``, ``class_abbrevs``,
        ``lateral_pairs`` (stated in the data set's dataset.json, or None), ``flips`` (the
        training configuration's, which TTA follows), and the test-time rule prediction uses by
        default, ``decoder`` and ``tta`` (the configuration's ``inference_decoder`` and ``inference_tta``).
    """
    path = resolve_checkpoint(path_or_run)
    payload = load_checkpoint(path)
    try:
        if payload.get("format") == FORMAT:
            model = build_network(payload["model_args"])
            model.load_state_dict(payload["model"])
            # the training flips decide how --tta flips; a checkpoint from before the key flipped as the reference
            config = payload.get("config") or {}
            preprocessing = {**REFERENCE_PREPROCESSING, **payload.get("preprocessing", {}),
                             "flips": config.get("flips", "reference"),
                             "decoder": config.get("inference_decoder", "unlabeled"),  # the test-time rule
                             "tta": bool(config.get("inference_tta", False))}
        else:
            model = from_reference_state_dict(payload, patch_size=patch_size, num_heads=num_heads)
            preprocessing = {**REFERENCE_PREPROCESSING, "patch_size": list(patch_size)}
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise InputError(f"{path}: cannot build a model from this checkpoint: {exc}") from None
    return model.to(device).eval(), preprocessing
