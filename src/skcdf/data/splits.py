"""Seeded train / eval / test and labeled / unlabeled splits (SPEC §5), and user-given split files.

Split files written, one id per line:
    train.txt, eval.txt, test.txt    labeled cases only (so every case in them can be evaluated or
                                     used for fully supervised training)
    labeled_<P>p.txt                 the training cases whose labels are used
    unlabeled_<P>p.txt               the other training cases, plus every case that has no label at all
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from skcdf.data.layout import read_id_list
from skcdf.utils import InputError

# Synapse's 20 / 4 / 6 of 30 (SPEC §5), the default proportions.
SYNAPSE_SPLIT = (20, 4, 6)
AMOS_SPLIT = (216, 24, 120)


def labeled_split_names(labeled_percent: float) -> tuple[str, str]:
    """``("labeled_20p", "unlabeled_20p")`` for 20 (a fractional percent keeps its digits: ``labeled_2.5p``)."""
    tag = f"{labeled_percent:g}p"
    return f"labeled_{tag}", f"unlabeled_{tag}"


def counts_from_fractions(total: int, fractions: Sequence[float]) -> tuple[int, int, int]:
    """Split ``total`` cases in proportion to ``fractions`` (train, eval, test), largest remainders
    rounded up, so that 216/24/120 of 360 cases gives exactly those numbers. A split with a positive
    fraction gets at least one case (taken from the largest) when there are enough cases."""
    weights = np.asarray(fractions, dtype=float)
    if weights.shape != (3,) or (weights < 0).any() or weights.sum() <= 0:
        raise InputError(f"split fractions must be three non-negative numbers, not {list(fractions)}")
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for index in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[index] += 1
    for index in np.flatnonzero((counts == 0) & (weights > 0)):
        if counts.max() > 1:
            counts[np.argmax(counts)] -= 1
            counts[index] += 1
    return tuple(int(c) for c in counts)


def labeled_count(num_train: int, labeled_percent: float) -> int:
    """Number of labeled training cases: ``floor(num_train · P / 100)`` as the reference does, at least 1."""
    if not 0 < labeled_percent <= 100:
        raise InputError(f"labeled percent must be in (0, 100], not {labeled_percent}")
    return max(1, math.floor(num_train * labeled_percent / 100 + 1e-9))


def make_splits(labeled_ids: Sequence[str], unlabeled_only_ids: Sequence[str], counts: Sequence[int],
                labeled_percent: float, seed: int, source: str = "the data set") -> dict[str, list[str]]:
    """Random, seeded splits of the labeled cases into train / eval / test, and of train into labeled / unlabeled.

    Args:
        labeled_ids: cases with a label map.
        unlabeled_only_ids: cases without one; they join the unlabeled pool.
        counts: (train, eval, test) numbers of cases.
        source: named in the error message.
    Raises:
        InputError: fewer labeled cases than the counts need, or a training set too small to split.
    """
    num_train, num_eval, num_test = (int(c) for c in counts)
    needed = num_train + num_eval + num_test
    if len(labeled_ids) < needed:
        raise InputError(f"{source}: {len(labeled_ids)} labeled cases, but the split "
                         f"{num_train}/{num_eval}/{num_test} (train/eval/test) needs {needed}")
    if needed < len(labeled_ids):
        warnings.warn(f"{source}: {len(labeled_ids) - needed} labeled cases are left out of the "
                      f"{num_train}/{num_eval}/{num_test} split", stacklevel=2)
    rng = np.random.default_rng(seed)
    order = [labeled_ids[i] for i in rng.permutation(len(labeled_ids))]
    train = order[:num_train]
    splits = {"train": sorted(train), "eval": sorted(order[num_train:num_train + num_eval]),
              "test": sorted(order[num_train + num_eval:needed])}
    splits.update(_labeled_unlabeled(train, unlabeled_only_ids, labeled_percent, rng, source))
    return splits


def _labeled_unlabeled(train: Sequence[str], unlabeled_only_ids: Sequence[str], labeled_percent: float,
                       rng: np.random.Generator, source: str) -> dict[str, list[str]]:
    num_labeled = labeled_count(len(train), labeled_percent)
    if num_labeled >= len(train) and not unlabeled_only_ids:
        raise InputError(f"{source}: {len(train)} training case(s) at {labeled_percent:g}% labeled leave no "
                         "unlabeled case; more cases or a lower labeled percent are needed")
    shuffled = [train[i] for i in rng.permutation(len(train))]
    labeled_name, unlabeled_name = labeled_split_names(labeled_percent)
    return {labeled_name: sorted(shuffled[:num_labeled]),
            unlabeled_name: sorted(shuffled[num_labeled:]) + sorted(unlabeled_only_ids)}


def read_user_splits(folder: str | Path, cases_with_label: Mapping[str, bool], labeled_percent: float,
                     seed: int) -> dict[str, list[str]]:
    """The split files of ``folder`` (every ``*.txt``), checked against the known cases.

    ``train.txt``, ``eval.txt`` and ``test.txt`` are required; ``labeled_<P>p``/``unlabeled_<P>p`` are
    drawn from train (seeded) when absent.

    Args:
        cases_with_label: every known case id → whether it has a label map.
    Raises:
        InputError: a missing folder or required file; a file naming an unknown case, or an unlabeled
            case where labels are needed (every split but the unlabeled ones).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: split folder not found")
    splits: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.txt")):
        ids = read_id_list(path)
        for case_id in ids:
            if case_id not in cases_with_label:
                raise InputError(f"{path}: names unknown case '{case_id}'")
            if not cases_with_label[case_id] and not path.stem.startswith("unlabeled"):
                raise InputError(f"{path}: case '{case_id}' has no label, so it can only be in an unlabeled split")
        splits[path.stem] = ids
    for required in ("train", "eval", "test"):
        if required not in splits:
            raise InputError(f"{folder / (required + '.txt')}: split file not found")
    labeled_name, unlabeled_name = labeled_split_names(labeled_percent)
    unlabeled_only = sorted(c for c, labeled in cases_with_label.items() if not labeled)
    if labeled_name not in splits:
        rng = np.random.default_rng(seed)
        splits.update(_labeled_unlabeled(splits["train"], unlabeled_only, labeled_percent, rng, str(folder)))
    elif unlabeled_name not in splits:
        labeled = set(splits[labeled_name])
        splits[unlabeled_name] = [c for c in splits["train"] if c not in labeled] + unlabeled_only
    return splits
