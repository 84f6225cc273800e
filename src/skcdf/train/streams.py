"""The training data streams: which cases a run trains on, and the random patches it draws from them.

Each stream (labeled, unlabeled) has its own torch.Generator that draws both its order and a seed
per item for the crop and flips (:class:`ShardedRandomSampler`), so batches do not depend on the
DataLoader workers (which persist across passes) or their number, and a run resumed from the
checkpointed generators draws exactly what the interrupted one would have. Under torchrun each
process draws its shard of every stream (a labeled split too small to shard is drawn whole by every
rank, each in its own order).

Public: the benchmarks (benchmarks/data_epoch.py) and tests build the trainer's streams from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from skcdf.data.laterality import Laterality, find_laterality
from skcdf.data.layout import has_label, read_split
from skcdf.data.loaders import CenterCropDataset, PatchDataset, WholeVolumeDataset, class_voxel_counts
from skcdf.train.config import Config
from skcdf.train.data_options import normalization, patch_sampling
from skcdf.train.processes import Processes
from skcdf.utils import InputError


class ShardedRandomSampler(Sampler[tuple[int, int]]):
    """A fresh random permutation per pass, this rank's share of it (DistributedSampler's scheme),
    each case with a seed for its crop and flips: (case index, augmentation seed) pairs.

    Driven by ``generator``, which every rank seeds identically so that the shards are disjoint (or,
    with world = 1, each rank seeds its own to draw from every case), and which is checkpointed so
    that a resumed run draws the same permutations and seeds. Seeding the augmentation here rather
    than in the DataLoader workers makes every batch independent of the workers: they can persist
    across passes, and ``num_workers`` does not change the run.
    """

    def __init__(self, size: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.size, self.generator, self.rank, self.world = size, generator, rank, world

    def __len__(self) -> int:
        return self.size // self.world

    def draw(self) -> list[tuple[int, int]]:
        """This rank's (case index, augmentation seed) pairs of the next pass; advances the generator."""
        order = torch.randperm(self.size, generator=self.generator)
        seeds = torch.randint(2**62, (self.size,), generator=self.generator)
        mine = slice(self.rank, len(self) * self.world, self.world)
        return list(zip(order[mine].tolist(), seeds[mine].tolist()))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.draw())


def stream_seed(seed: int, stream: str, rank: int | None = None) -> int:
    """A well-mixed 63-bit seed for one data stream (and rank, for its DataLoader workers)."""
    keys = [seed, {"labeled": 1, "unlabeled": 2}[stream]] + ([] if rank is None else [rank + 1])
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


def shards_labeled_cases(num_labeled: int, batch_labeled: int, world: int) -> bool:
    """Whether the labeled cases are sharded across the processes: only when every shard fills a batch.

    Otherwise (e.g. 4 labeled cases, 2 per step, 8 GPUs) every process draws from all of them.
    """
    return num_labeled // world >= batch_labeled


def make_stream(root: Path, cases: list[str], config: Config, window: Any, laterality: Laterality,
                 with_labels: bool, stream: str, procs: Processes,
                 pin_memory: bool) -> tuple[DataLoader, dict[str, torch.Generator]]:
    """Training loader of random patches; returns it with the generators that determine it.

    Patches are flipped as ``config.flips`` says, with the data set's ``laterality`` (labels too,
    where the unlabeled stream carries them for the monitor).

    The unlabeled stream, and the labeled one where it has enough cases, is sharded: every rank draws
    the same permutation per pass and takes its share. A labeled stream too small to shard is drawn
    whole by every rank in its own order, seeded with seed + rank: rank r draws its labeled cases as
    a one-process run with seed + r would.
    """
    batch = getattr(config, f"batch_{stream}")  # not from with_labels: the unlabeled stream may carry labels for the monitor
    if stream == "labeled" and not shards_labeled_cases(len(cases), batch, procs.world):
        order = torch.Generator().manual_seed(stream_seed(config.seed + procs.rank, stream))
        sampler = ShardedRandomSampler(len(cases), order)
    else:
        order = torch.Generator().manual_seed(stream_seed(config.seed, stream))
        sampler = ShardedRandomSampler(len(cases), order, procs.rank, procs.world)
    # the DataLoader's own seed draws (its workers' base seed) come from here, not from the global generator
    workers = torch.Generator().manual_seed(stream_seed(config.seed, stream, procs.rank))
    dataset = PatchDataset(root, cases, tuple(config.patch_size), with_labels=with_labels,
                           window=window, flips=config.flips, laterality=laterality,
                           sampling=patch_sampling(config, stream))
    # persistent workers: starting them anew for every pass (4 per epoch for 4 labeled cases at 2 per
    # step) cost more than loading the batches (measured, docs/performance.md)
    loader = DataLoader(dataset, batch_size=batch, drop_last=True, num_workers=config.num_workers,
                        persistent_workers=config.num_workers > 0, sampler=sampler, generator=workers,
                        pin_memory=pin_memory)
    return loader, {f"{stream}_order": order, f"{stream}_workers": workers}


def forever(loader: DataLoader) -> Iterator[dict]:
    """Batches of ``loader`` pass after pass (the smaller labeled set is cycled to match the epoch)."""
    if len(loader) == 0:  # fewer cases than a batch (drop_last): looping would never yield
        raise RuntimeError(f"a training stream of {len(loader.dataset)} cases yields no batch of {loader.batch_size}")
    while True:
        yield from loader


class Cases(NamedTuple):
    """The cases of one run, by split role."""

    labeled: list[str]      # cases with labels the run trains on
    unlabeled: list[str]
    validation: list[str]   # empty when the run does not validate


def select_cases(config: Config, root: Path, procs: Processes) -> Cases:
    """(cases with labels the run trains on, unlabeled cases, validation cases), checked against the batch sizes."""
    unlabeled = read_split(root, config.unlabeled_split)
    labeled_split = getattr(config, config.method.labeled_split)
    labeled = read_split(root, labeled_split)
    wanted = config.labeled_cases
    if wanted is not None:
        if wanted > len(labeled):
            raise InputError(f"labeled_cases: {wanted} requested but split {labeled_split!r} "
                             f"of {root} has {len(labeled)} cases")
        labeled = labeled[:wanted]
    if len(labeled) < config.batch_labeled:  # too few to shard is fine: every rank draws from all (make_stream)
        raise InputError(f"batch_labeled: {config.batch_labeled} per step needs at least that many labeled "
                         f"cases, the split has {len(labeled)}")
    if len(unlabeled) // procs.world < config.batch_unlabeled:
        raise InputError(f"batch_unlabeled: {config.batch_unlabeled} per step x {procs.world} process(es) needs "
                         f"at least {config.batch_unlabeled * procs.world} cases, the split has {len(unlabeled)}")
    validation = read_split(root, config.val_split) if config.val_every else []
    return Cases(labeled, unlabeled, validation)


def class_counts(config: Config, root: Path, labeled: list[str], num_classes: int) -> np.ndarray:
    """n_c for the balanced masks, from the configured source. (K,)"""
    source = config.class_frequency
    if isinstance(source, list):
        if len(source) != num_classes:
            raise InputError(f"class_frequency: {len(source)} counts given, the data set has {num_classes} classes")
        return np.asarray(source, dtype=np.float64)
    cases = labeled if source == "labeled" else read_split(root, config.train_split)
    return class_voxel_counts(root, cases, num_classes)


@dataclass
class TrainingData:
    """The loaders of one run and the generators that determine them (checkpointed for a resume)."""

    labeled: DataLoader                   # random patches of the labeled cases
    unlabeled: DataLoader | None          # random patches of the unlabeled cases; None: supervised, batch_unlabeled 0
    unlabeled_has_labels: bool            # true labels of the unlabeled cases, for the pseudo-label monitor only
    validation: DataLoader | None         # the validation cases: centre crops, or whole (val_region)
    generators: dict[str, torch.Generator]
    iterations_per_epoch: int
    background: float = 0.0               # the normalised air, which pads a volume smaller than a window

    def batches(self) -> tuple[Iterator[dict], Iterator[dict] | None]:
        """Fresh iterators over the labeled and unlabeled batches, for one epoch."""
        return forever(self.labeled), None if self.unlabeled is None else forever(self.unlabeled)


def open_streams(config: Config, root: Path, info: dict[str, Any], cases: Cases, procs: Processes,
                 pin_memory: bool = False) -> TrainingData:
    """The run's loaders: the labeled stream, the unlabeled one (semi-supervised methods) and validation.

    info: the data set's dataset.json (window, class names and left/right pairs for the flips).
    """
    window = normalization(config, info, root)
    laterality = find_laterality(info["class_names"], info["class_abbrevs"], info["lateral_pairs"])
    labeled, generators = make_stream(root, cases.labeled, config, window, laterality, True, "labeled", procs,
                                      pin_memory)
    unlabeled, unlabeled_has_labels = None, False
    if config.method.semi and config.batch_unlabeled > 0:
        # The unlabeled cases' labels, where the data set has them, feed only the pseudo-label monitor.
        unlabeled_has_labels = all(has_label(root, case) for case in cases.unlabeled)
        unlabeled, unlabeled_generators = make_stream(root, cases.unlabeled, config, window, laterality,
                                                      unlabeled_has_labels, "unlabeled", procs, pin_memory)
        generators.update(unlabeled_generators)
    validation = None
    if cases.validation and config.val_region == "whole":  # volumes of different sizes: one at a time
        volumes = WholeVolumeDataset(root, cases.validation, tuple(config.patch_size), window=window)
        validation = DataLoader(volumes, batch_size=1, pin_memory=pin_memory)
    elif cases.validation:
        crops = CenterCropDataset(root, cases.validation, tuple(config.patch_size), window=window)
        validation = DataLoader(crops, batch_size=config.batch_labeled + config.batch_unlabeled, pin_memory=pin_memory)
    # without unlabeled volumes (a control), an epoch keeps the length it has when they come at the labeled batch size
    per_step = config.batch_unlabeled or config.batch_labeled
    iterations = config.iterations_per_epoch or len(cases.unlabeled) // (per_step * procs.world)
    return TrainingData(labeled, unlabeled, unlabeled_has_labels, validation, generators, iterations,
                        window.background)
