"""One device and precision policy, for training, :class:`skcdf.segmenter.Segmenter` and the CLI.

- Device: ``auto`` is CUDA (this process's GPU), else Apple's MPS, else the CPU; a device that is
  asked for but missing is an InputError, before any work.
- Precision: mixed precision (autocast) runs on CUDA, in bf16 where the GPU supports it and fp16
  otherwise (training then scales the gradients), and in training on CPUs with native bf16 (AVX512-BF16
  or AMX), where it measured 25-30 % faster per iteration (benchmarks/README.md). Other CPUs and MPS run
  fp32, as the reference; so does prediction on any CPU.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

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


@functools.cache
def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (the ``avx512_bf16`` or ``amx_bf16`` flag; Linux only).

    torch runs CPU bf16 everywhere, but without these instructions it emulates it, slower than fp32.
    """
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def fp32_where_cpu_bf16_fails(conv: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for 3×3×3 convolutions (padding 1), in fp32 where CPU bf16 autocast computes them wrongly.

    oneDNN 3.12 (torch 2.13's CPU build) returns garbage weight gradients (errors up to 1e37, and NaN) for a
    bf16 3×3×3 convolution over an input only 2 voxels deep: the bottleneck of a 32-voxel-deep patch, as
    in the ``phantom`` presets (docs/performance.md, tests/test_device.py). Such a map is tiny, so fp32
    there costs nothing measurable. x: (b, C, D, H, W).
    """
    if torch.is_autocast_enabled("cpu") and x.device.type == "cpu" and x.shape[2] < 3:
        with torch.autocast("cpu", enabled=False):
            return conv(x.float())
    return conv(x)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bf16 on the CPU and where the GPU supports it, else fp16 (which
    needs a gradient scaler in training)."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """Autocast for ``device`` with the policy's dtype; off (fp32) unless ``enabled`` and on CUDA or the CPU."""
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=enabled and device.type in ("cuda", "cpu"))


def describe_precision(device: torch.device, amp: bool, channels_last: bool, amp_setting: bool | str) -> str:
    """How a run computes, for its log: e.g. ``fp32``, ``bfloat16 autocast, channels_last_3d``, and on a CPU
    why autocast is on (``amp_setting``: the configuration's ``amp``)."""
    precision = f"{str(amp_dtype(device)).removeprefix('torch.')} autocast" if amp else "fp32"
    if amp and device.type == "cpu":
        precision += " (this CPU has native bf16" + (")" if amp_setting is True else ": amp auto turns it on)")
    return precision + (", channels_last_3d" if channels_last else "")


def hardware_settings(amp: bool | str, channels_last: bool | str, device_type: str) -> dict[str, bool]:
    """{"amp": ..., "channels_last": ...} of a run on a device of type ``device_type`` ("cuda", "cpu", "mps").

    ``auto`` turns both on for CUDA (bf16 autocast and channels_last_3d: the fast path of recent GPUs)
    and for a CPU with native bf16 (:func:`cpu_has_native_bf16`; bf16 autocast with channels_last_3d was
    the fastest CPU variant of benchmarks/train_step.py; with ``amp: false`` the layout stays contiguous
    there), and off elsewhere, so that other CPUs and MPS keep the reference's fp32 numerics and memory
    layout. ``amp: false`` keeps a run in fp32, as the reference trains; ``amp: true`` asks for autocast on
    CUDA or any CPU.

    Raises:
        InputError: ``amp: true`` on a device other than CUDA or the CPU.
    """
    fast = device_type == "cuda" or (device_type == "cpu" and cpu_has_native_bf16())
    resolved_amp = fast if amp == "auto" else amp
    if resolved_amp and device_type not in ("cuda", "cpu"):
        raise InputError(f"amp (mixed precision) needs a CUDA device or the CPU, the run uses {device_type}")
    # on the CPU channels_last_3d pays only with bf16; fp32 keeps the reference's layout (and its results)
    auto_layout = device_type == "cuda" or (device_type == "cpu" and bool(resolved_amp) and fast)
    return {"amp": bool(resolved_amp), "channels_last": auto_layout if channels_last == "auto" else channels_last}
