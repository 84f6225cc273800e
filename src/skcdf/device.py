"""One device and precision policy, for training, :class:`skcdf.segmenter.Segmenter` and the CLI.

- Device: ``auto`` is CUDA (this process's GPU), else Apple's MPS, else the CPU; a device that is
  asked for but missing is an InputError, before any work.
- Precision: mixed precision (autocast) runs on CUDA only, in bf16 where the GPU supports it and
  fp16 otherwise (training then scales the gradients); the CPU and MPS run fp32, as the reference.
"""

from __future__ import annotations

import torch

from skcdf.utils import InputError

#: The names a ``device`` setting takes besides ``cuda:N``.
DEVICE_NAMES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0, what: str = "device") -> torch.device:
    """"auto" (or None) → CUDA, else MPS, else CPU; "cuda" → cuda:<local rank> (this torchrun process's GPU).

    what: how messages name the setting (e.g. ``--device``).

    Raises:
        InputError: ``name`` is not a torch device, or names one this machine does not have.
    """
    given = "auto" if name is None else str(name)
    name = given
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device_type(name, what)  # InputError for a name torch does not know
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{what} {given}: CUDA is not available on this machine")
    if device.type == "mps" and not mps_available():
        raise InputError(f"{what} {given}: MPS is not available on this machine")
    return device


def device_type(name: str | torch.device, what: str = "device") -> str:
    """The type of device ``name`` names ("cpu", "cuda", "mps", ...), whether or not this machine has it.

    Raises:
        InputError: ``name`` is not a torch device.
    """
    try:
        return torch.device(name).type
    except RuntimeError:
        raise InputError(f"{what} {name}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None


def mps_available() -> bool:
    """Whether Apple's Metal backend can run here."""
    return torch.backends.mps.is_available()


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bf16 where the GPU supports it, else fp16 (which needs a
    gradient scaler in training)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """Autocast for ``device`` with the policy's dtype; off (fp32) unless ``enabled`` and on CUDA."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled and device.type == "cuda")


def hardware_settings(amp: bool | str, channels_last: bool | str, device_type: str) -> dict[str, bool]:
    """{"amp": ..., "channels_last": ...} of a run on a device of type ``device_type`` ("cuda", "cpu", "mps").

    ``auto`` turns both on for CUDA (bf16 autocast and channels_last_3d: the fast path of recent GPUs)
    and off elsewhere, so that CPU and MPS runs keep the reference's fp32 numerics and memory layout.
    ``amp: false`` keeps CUDA runs in fp32, as the reference trains.

    Raises:
        InputError: ``amp: true`` on a device other than CUDA.
    """
    settings = {key: device_type == "cuda" if value == "auto" else value
                for key, value in (("amp", amp), ("channels_last", channels_last))}
    if settings["amp"] and device_type != "cuda":
        raise InputError(f"amp (mixed precision) needs a CUDA device, the run uses {device_type}")
    return settings
