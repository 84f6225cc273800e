"""Class voxel counts of a prepared data set and the table ``skcdf stats`` prints."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from skcdf.data.layout import load_label, volume_dir
from skcdf.utils import InputError


def class_voxel_counts(root: str | os.PathLike, case_ids: Sequence[str], num_classes: int) -> np.ndarray:
    """Voxels of each class summed over the label maps of ``case_ids``: int64 (K,).

    Raises:
        InputError: a case has no label map, or a label value outside 0..K-1.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for case_id in case_ids:
        label = load_label(root, case_id)
        if label.size and (label.min() < 0 or label.max() >= num_classes):
            raise InputError(f"{volume_dir(root) / f'{case_id}_label.npy'}: label values outside 0..{num_classes - 1}")
        counts += np.bincount(label.ravel(), minlength=num_classes)
    return counts


def fraction_table(counts: np.ndarray, class_names: Sequence[str], class_abbrevs: Sequence[str]) -> str:
    """A text table of each class's voxels, share of all voxels and share of foreground voxels,
    ending with the ratio of the largest to the smallest foreground class."""
    total, foreground = int(counts.sum()), int(counts[1:].sum())
    rows = [f"{'':>3} {'class':<6}{'name':<26}{'voxels':>12}{'% all':>9}{'% fg':>8}"]
    for index, (count, name, abbrev) in enumerate(zip(counts, class_names, class_abbrevs)):
        share_fg = f"{100 * count / foreground:8.2f}" if index and foreground else f"{'':>8}"
        share_all = 100 * count / max(total, 1)
        rows.append(f"{index:>3} {abbrev:<6}{name[:25]:<26}{int(count):>12}{share_all:9.3f}{share_fg}")
    present = [k for k in range(1, len(counts)) if counts[k] > 0]
    if present:
        largest = max(present, key=lambda k: counts[k])
        smallest = min(present, key=lambda k: counts[k])
        rows.append(f"largest / smallest foreground class: {class_abbrevs[largest]} / {class_abbrevs[smallest]}"
                    f" = {counts[largest] / counts[smallest]:.0f}x")
    missing = [class_abbrevs[k] for k in range(1, len(counts)) if counts[k] == 0]
    if missing:
        rows.append(f"classes with no voxel: {', '.join(missing)}")
    return "\n".join(rows)
