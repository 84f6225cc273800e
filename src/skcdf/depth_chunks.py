"""The sliding window over a long scan one chunk of slices at a time, for the resampling back to the scan.

A model of the spacing-based path predicts a whole-body CT on a network grid of, say, 400×273×273
voxels, and the sliding window's output (K probabilities per voxel) is then the largest thing in memory:
0.78 GiB at 14 classes even in float16. :class:`DepthChunks` never holds it whole. It computes the
probabilities of a chunk of slices from exactly the windows that the sliding window over the whole
volume uses for those slices (MONAI's window starts, so the values are the same up to float rounding),
hands them to :func:`skcdf.data.back_to_scan.labels_in_original_space` slab by slab, and drops what no
later slab needs. The windows that straddle two chunks run twice: one window row in ``CHUNK_STEPS``
more, 1/8 at the default.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.data.utils import dense_patch_slices

#: Depth of a chunk, in window steps along depth (128 slices at the default stride of 16).
CHUNK_STEPS = 8


def window_starts(size: int, patch: int, step: int) -> list[int]:
    """Where MONAI's sliding window starts its windows along one axis of ``size`` voxels."""
    if size <= patch:  # one window (MONAI pads a shorter axis to the patch)
        return [0]
    return sorted({int(window[0].start) for window in dense_patch_slices((size,), (patch,), (step,))})


class DepthChunks:
    """The sliding window's probabilities ``(K, d, h, w)`` on the network grid, computed chunk by chunk
    along depth as :meth:`slab` asks for them (slabs in increasing order).

    Args:
        window: ``(a, b) -> (K, b - a, h, w)``: the sliding window over slices ``a..b-1`` of the network
            input alone (:func:`skcdf.infer.depth_window`).
        shape: the network grid ``(d, h, w)``.
        patch: the window's depth; ``step``: its step along depth.
        chunk_steps: the chunk's depth in steps (at least one window's depth).
    """

    def __init__(self, window: Callable[[int, int], torch.Tensor], shape: tuple[int, int, int], patch: int,
                 step: int, chunk_steps: int = CHUNK_STEPS) -> None:
        self.window = window
        self.shape = tuple(shape)
        self.patch = patch
        self.starts = window_starts(shape[0], patch, step)
        self.chunk = max(chunk_steps * step, patch)
        self._chunks: list[tuple[int, torch.Tensor]] = []  # (first slice, probabilities (K, n, h, w)), in order
        self._computed = 0  # slices 0..computed-1 have been computed

    def slab(self, low: int, high: int) -> np.ndarray:
        """Probabilities of network slices ``low..high-1``: ``(K, high - low, h, w)`` on the CPU."""
        if self._chunks and low < self._chunks[0][0]:
            raise ValueError(f"slices from {low} were asked for after they were dropped: read slabs in order")
        self._chunks = [(first, p) for first, p in self._chunks if first + p.shape[1] > low]  # no later slab needs the rest
        while self._computed < high:
            # the few slices still needed, copied, so that the window output they are a view of goes first
            self._chunks = [(max(first, low), p[:, max(low - first, 0):].clone()) for first, p in self._chunks]
            stop = min(self._computed + self.chunk, self.shape[0])
            self._chunks.append((self._computed, self._compute(self._computed, stop)))
            self._computed = stop
        pieces = [p[:, max(low - first, 0):high - first] for first, p in self._chunks if first < high]
        return (torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0]).numpy()

    def _compute(self, first: int, stop: int) -> torch.Tensor:
        """Slices ``first..stop-1`` (a view on the CPU), from the sliding window over the slices of the
        windows that touch them."""
        touching = [s for s in self.starts if s < stop and s + self.patch > first]
        a, b = touching[0], min(touching[-1] + self.patch, self.shape[0])
        return self.window(a, b)[:, first - a:stop - a].cpu()
