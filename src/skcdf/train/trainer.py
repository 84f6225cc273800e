"""The training loop: one readable file, no framework (in the spirit of nanoGPT's train.py).

``train(config, data_dir, out_dir, resume=False)`` trains any variant of SPEC §3 and writes the run
folder: config.yaml, last.pt, best.pt, metrics.csv, train.log and tb/ (TensorBoard).

Reproducibility: the global RNGs are seeded once (seed + rank); each data stream (labeled,
unlabeled) has its own torch.Generator that draws both its order and a seed per item for the crop
and flips, so batches do not depend on the DataLoader workers (which persist across passes) or
their number. All of them are checkpointed at epoch boundaries, and every epoch starts fresh data
iterators, so a resumed run continues exactly where the interrupted one was (bit for bit on CPU).

Multi-GPU: under ``torchrun`` each process trains on its shard of both streams with
DistributedDataParallel (a labeled split too small to shard is drawn whole by every rank, each in
its own order); the SKCM's cross attention stays within each rank's own [X_L; X_U]. Only rank 0
validates and writes; checkpoints are written in the background (skcdf.checkpoint.CheckpointWriter).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from skcdf.checkpoint import CheckpointWriter
from skcdf.data.laterality import Laterality, find_laterality
from skcdf.train.balance import class_keep_probabilities, smallest_classes, unlabeled_keep_probabilities
from skcdf.train.config import DEFAULTS, RUNTIME_KEYS, hardware_settings, step_kind, to_yaml
from skcdf.train.knowledge_transfer import KnowledgeTransfer, parse_ema_order
from skcdf.train.monitor import HEADS, PseudoLabelMonitor, validate_heads
from skcdf.train.step import TERMS, TwoFlowForward, semi_supervised_loss, supervised_loss
from skcdf.utils import InputError, atomic_write_text


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


# ----------------------------------------------------------------------------- schedules (SPEC §2)

def poly_lr(base_lr: float, epoch: int, epochs: int, power: float = 0.9) -> float:
    """lr = base · (1 − epoch/epochs)^power, for the 0-based epoch about to run."""
    return base_lr * (1.0 - epoch / epochs) ** power


def rampup_weight(lambda_u: float, epoch: int, rampup_epochs: int) -> float:
    """λ(t) = λ_u · exp(−5 (1 − t/T)²), t = epoch clipped to T; T = 0 means no ramp-up."""
    if rampup_epochs == 0:
        return lambda_u
    phase = 1.0 - min(epoch, rampup_epochs) / rampup_epochs
    return lambda_u * math.exp(-5.0 * phase * phase)


# ----------------------------------------------------------------------------- processes and devices

@dataclass(frozen=True)
class Processes:
    """Where this process stands among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _start_processes() -> tuple[Processes, bool]:
    """Join the process group torchrun describes in the environment; (processes, whether we started it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), False
    procs = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return procs, False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return procs, True


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" → CUDA (this process's GPU), else MPS, else CPU; "cuda" → cuda:<local rank>."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but MPS is not available")
    return device


# ----------------------------------------------------------------------------- data

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

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=self.generator)
        seeds = torch.randint(2**62, (self.size,), generator=self.generator)
        mine = slice(self.rank, len(self) * self.world, self.world)
        return zip(order[mine].tolist(), seeds[mine].tolist())


def _stream_seed(seed: int, stream: str, rank: int | None = None) -> int:
    """A well-mixed 63-bit seed for one data stream (and rank, for its DataLoader workers)."""
    keys = [seed, {"labeled": 1, "unlabeled": 2}[stream]] + ([] if rank is None else [rank + 1])
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


def shards_labeled_cases(num_labeled: int, batch_labeled: int, world: int) -> bool:
    """Whether the labeled cases are sharded across the processes: only when every shard fills a batch.

    Otherwise (e.g. 4 labeled cases, 2 per step, 8 GPUs) every process draws from all of them.
    """
    return num_labeled // world >= batch_labeled


def _make_stream(root: Path, cases: list[str], config: dict, window: Any, laterality: Laterality,
                 with_labels: bool, stream: str, procs: Processes,
                 pin_memory: bool) -> tuple[DataLoader, dict[str, torch.Generator]]:
    """Training loader of random patches; returns it with the generators that determine it.

    Patches are flipped as ``config["flips"]`` says, with the data set's ``laterality`` (labels too,
    where the unlabeled stream carries them for the monitor).

    The unlabeled stream, and the labeled one where it has enough cases, is sharded: every rank draws
    the same permutation per pass and takes its share. A labeled stream too small to shard is drawn
    whole by every rank in its own order, seeded with seed + rank: rank r draws its labeled cases as
    a one-process run with seed + r would.
    """
    from skcdf.data.loaders import PatchDataset

    batch = config[f"batch_{stream}"]  # not from with_labels: the unlabeled stream may carry labels for the monitor
    if stream == "labeled" and not shards_labeled_cases(len(cases), batch, procs.world):
        order = torch.Generator().manual_seed(_stream_seed(config["seed"] + procs.rank, stream))
        sampler = ShardedRandomSampler(len(cases), order)
    else:
        order = torch.Generator().manual_seed(_stream_seed(config["seed"], stream))
        sampler = ShardedRandomSampler(len(cases), order, procs.rank, procs.world)
    # the DataLoader's own seed draws (its workers' base seed) come from here, not from the global generator
    workers = torch.Generator().manual_seed(_stream_seed(config["seed"], stream, procs.rank))
    dataset = PatchDataset(root, cases, tuple(config["patch_size"]), with_labels=with_labels,
                           window=window, flips=config["flips"], laterality=laterality)
    # persistent workers: starting them anew for every pass (4 per epoch for 4 labeled cases at 2 per
    # step) cost more than loading the batches (measured, docs/performance.md)
    loader = DataLoader(dataset, batch_size=batch, drop_last=True, num_workers=config["num_workers"],
                        persistent_workers=config["num_workers"] > 0, sampler=sampler, generator=workers,
                        pin_memory=pin_memory)
    return loader, {f"{stream}_order": order, f"{stream}_workers": workers}


def _forever(loader: DataLoader) -> Iterator[dict]:
    """Batches of ``loader`` pass after pass (the smaller labeled set is cycled to match the epoch)."""
    if len(loader) == 0:  # fewer cases than a batch (drop_last): looping would never yield
        raise RuntimeError(f"a training stream of {len(loader.dataset)} cases yields no batch of {loader.batch_size}")
    while True:
        yield from loader


def _select_cases(config: dict, root: Path, procs: Processes) -> tuple[list[str], list[str], list[str]]:
    """(cases with labels the run trains on, unlabeled cases, validation cases), checked against the batch sizes."""
    from skcdf.data.layout import read_split

    unlabeled = read_split(root, config["unlabeled_split"])
    if config["variant"] == "fully_supervised":
        labeled = read_split(root, config["train_split"])
    else:
        labeled = read_split(root, config["labeled_split"])
    wanted = config["labeled_cases"]
    if wanted is not None:
        if wanted > len(labeled):
            raise InputError(f"labeled_cases: {wanted} requested but split {config['labeled_split']!r} "
                             f"of {root} has {len(labeled)} cases")
        labeled = labeled[:wanted]
    if len(labeled) < config["batch_labeled"]:  # too few to shard is fine: every rank draws from all (_make_stream)
        raise InputError(f"batch_labeled: {config['batch_labeled']} per step needs at least that many labeled "
                         f"cases, the split has {len(labeled)}")
    if len(unlabeled) // procs.world < config["batch_unlabeled"]:
        raise InputError(f"batch_unlabeled: {config['batch_unlabeled']} per step x {procs.world} process(es) needs "
                         f"at least {config['batch_unlabeled'] * procs.world} cases, the split has {len(unlabeled)}")
    validation = read_split(root, config["val_split"]) if config["val_every"] else []
    return labeled, unlabeled, validation


def _class_counts(config: dict, root: Path, labeled: list[str], num_classes: int) -> np.ndarray:
    """n_c for the balanced masks, from the configured source. (K,)"""
    from skcdf.data.layout import read_split
    from skcdf.data.loaders import class_voxel_counts

    source = config["class_frequency"]
    if isinstance(source, list):
        if len(source) != num_classes:
            raise InputError(f"class_frequency: {len(source)} counts given, the data set has {num_classes} classes")
        return np.asarray(source, dtype=np.float64)
    cases = labeled if source == "labeled" else read_split(root, config["train_split"])
    return class_voxel_counts(root, cases, num_classes)


# ----------------------------------------------------------------------------- run folder, checkpoints, RNG

def _check_run_folder(out: Path, config: dict, resume: bool) -> bool:
    """Refuse to overwrite another run; returns True when there is a last.pt to resume from."""
    config_file = out / "config.yaml"
    if not config_file.exists():
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{out}: the folder is not empty and holds no skcdf run (no config.yaml); choose another --out")
        return False
    previous = yaml.safe_load(config_file.read_text()) or {}
    # a key added since that run was written has its default there (the behaviour before the key existed)
    changed = [f"{key}: {previous.get(key, DEFAULTS[key])!r} -> {config.get(key)!r}" for key in DEFAULTS
               if key not in RUNTIME_KEYS and previous.get(key, DEFAULTS[key]) != config.get(key)]
    if changed:
        raise InputError(f"{out}: holds a run with a different configuration ({'; '.join(changed)}); "
                         "choose another --out")
    if not resume:
        raise InputError(f"{out}: already holds a run of this configuration; pass --resume to continue it "
                         "or choose another --out")
    return (out / "last.pt").exists()


def _rng_state(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state of this process, in types that torch.load(weights_only=True) accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _restore_rng_state(state: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state.tolist()), py_gauss))
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


def _gather(obj: Any, procs: Processes) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-element list without torchrun)."""
    if procs.world == 1:
        return [obj]
    gathered: list[Any] = [None] * procs.world
    dist.all_gather_object(gathered, obj)
    return gathered


def _read_metric_rows(path: Path, before_epoch: int) -> list[dict[str, str]]:
    """Rows of an interrupted run's metrics.csv for the epochs already checkpointed."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) < before_epoch]


def _write_metric_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def _open_log(path: Path, enabled: bool) -> logging.Logger:
    """A logger writing to RUN/train.log and, through tqdm, to the console (rank 0 only)."""
    logger = logging.getLogger(f"skcdf.train.{path.resolve()}")
    logger.setLevel(logging.INFO if enabled else logging.CRITICAL)
    logger.propagate = False
    if enabled:
        file_handler = logging.FileHandler(path)
        # milliseconds: benchmarks/gpu_check.sh times epochs from these lines
        file_handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%Y-%m-%d %H:%M:%S"))

        class _ConsoleHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                tqdm.write(record.getMessage())

        logger.addHandler(file_handler)
        logger.addHandler(_ConsoleHandler())
    return logger


def _close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """Everything the loop needs, built once by :func:`_set_up` (fresh or from last.pt)."""

    config: dict[str, Any]
    out: Path
    procs: Processes
    device: torch.device
    num_classes: int
    class_abbrevs: list[str]                    # foreground classes, for the metric columns
    small_classes: list[int]                    # the 6 smallest classes (by n_c), for val_dice_small_<head>
    preprocessing: dict[str, Any]               # stored in checkpoints for `skcdf predict`
    model: nn.Module
    step_module: nn.Module                      # what the step calls: model, TwoFlowForward, DDP or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: bool                                   # autocast on: config amp, "auto" resolved for the device
    amp_dtype: torch.dtype
    channels_last: bool                         # channels_last_3d model and inputs, "auto" resolved likewise
    transfer: KnowledgeTransfer
    semi: bool
    labeled_loader: DataLoader
    unlabeled_loader: DataLoader | None
    unlabeled_has_labels: bool                  # true labels of the unlabeled cases, for the pseudo-label monitor only
    generators: dict[str, torch.Generator]
    val_loader: DataLoader | None
    keep_labeled: torch.Tensor                  # (K,) balanced-mask keep probabilities p
    iterations_per_epoch: int
    pseudo_monitor: PseudoLabelMonitor
    log: logging.Logger
    writer: Any                                 # TensorBoard SummaryWriter on rank 0, else None
    columns: list[str]
    rows: list[dict[str, Any]]
    checkpoints: CheckpointWriter = field(default_factory=CheckpointWriter)  # writes in the background
    resumed_from_world: int | None = None       # process count of the interrupted run, when resuming
    start_epoch: int = 0
    iteration: int = 0
    best_dice: float = -math.inf
    best_epoch: int = -1

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


def _metric_columns(class_abbrevs: list[str]) -> list[str]:
    """metrics.csv columns: schedule, losses, validation Dice (inference head per class, every head),
    pseudo-label quality."""
    return (["epoch", "iteration", "lr", "lambda", "loss", "loss_sup", "loss_unsup"]
            + [f"loss_{term}" for term in TERMS]
            + ["val_dice_mean"] + [f"val_dice_{abbrev}" for abbrev in class_abbrevs]
            + [f"val_dice_{head}" for head in HEADS] + [f"val_dice_small_{head}" for head in HEADS]
            + ["pseudo_dice_main", "pseudo_dice_aux", "pseudo_fg_main", "pseudo_fg_aux", "true_fg"])


def _build_model(config: dict[str, Any], num_classes: int, procs: Processes, device: torch.device,
                 channels_last: bool) -> nn.Module:
    from skcdf.nn import SKCDFNet

    model = SKCDFNet(in_channels=1, num_classes=num_classes, filters=config["filters"],
                     patch_size=config["patch_size"], num_heads=config["num_heads"], skcm=config["skcm"],
                     shared_decoder=config["shared_decoder"], aux_heads=config["aux_heads"],
                     dropout=config["dropout"])
    for decoder in {model.labeled_decoder, model.unlabeled_decoder}:
        decoder.detach_aux = config["balance_mode"] == "decoupled"  # the balanced loss trains the head alone
    if procs.world > 1 and config["sync_batchnorm"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last_3d)
    return model


def _wrap_step_module(model: nn.Module, config: dict[str, Any], semi: bool, procs: Processes,
                      device: torch.device) -> nn.Module:
    """The module the step calls: both flows in one call (semi), under DDP and torch.compile if configured."""
    step_module: nn.Module = TwoFlowForward(model) if semi else model
    if procs.world > 1:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None,
            # labeled_only/fully_supervised with two decoders never touch D_l
            find_unused_parameters=not semi and not config["shared_decoder"])
    if config["compile"]:
        step_module = torch.compile(step_module)
    return step_module


def _set_up(config: dict[str, Any], root: Path, out: Path, resume: bool, procs: Processes) -> Run:
    """Check the input (before any work), build model, optimiser and data streams, restore last.pt."""
    from skcdf.checkpoint import load_checkpoint
    from skcdf.data.layout import has_label, read_dataset_info
    from skcdf.data.loaders import CenterCropDataset

    device = resolve_device(config["device"], procs.local_rank)
    hardware = hardware_settings(config, device.type)  # amp, channels_last: "auto" is on for CUDA only
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels once
    info = read_dataset_info(root)
    num_classes = int(info["num_classes"])
    labeled_cases, unlabeled_cases, val_cases = _select_cases(config, root, procs)
    counts = _class_counts(config, root, labeled_cases, num_classes)
    iterations_per_epoch = (config["iterations_per_epoch"]
                            or len(unlabeled_cases) // (config["batch_unlabeled"] * procs.world))
    can_resume = _check_run_folder(out, config, resume)
    if procs.world > 1:
        dist.barrier()  # every rank has read the folder before rank 0 writes into it

    random.seed(config["seed"] + procs.rank)
    np.random.seed(config["seed"] + procs.rank)
    torch.manual_seed(config["seed"] + procs.rank)
    model = _build_model(config, num_classes, procs, device, hardware["channels_last"])
    semi = step_kind(config) == "semi"
    # fused: one kernel for all parameter tensors instead of a loop over them; the same numbers
    optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                nesterov=config["nesterov"], weight_decay=config["weight_decay"], fused=True)
    amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    window = info.get("window")
    pin = device.type == "cuda"
    laterality = find_laterality(info["class_names"], info["class_abbrevs"], info["lateral_pairs"])
    labeled_loader, generators = _make_stream(root, labeled_cases, config, window, laterality, True, "labeled",
                                              procs, pin)
    unlabeled_loader, unlabeled_has_labels = None, False
    if semi:
        # The unlabeled cases' labels, where the data set has them, feed only the pseudo-label monitor.
        unlabeled_has_labels = all(has_label(root, case) for case in unlabeled_cases)
        unlabeled_loader, unlabeled_generators = _make_stream(
            root, unlabeled_cases, config, window, laterality, unlabeled_has_labels, "unlabeled", procs, pin)
        generators.update(unlabeled_generators)
    val_loader = None
    if val_cases:
        val_dataset = CenterCropDataset(root, val_cases, tuple(config["patch_size"]), window=window)
        val_loader = DataLoader(val_dataset, batch_size=config["batch_labeled"] + config["batch_unlabeled"],
                                pin_memory=pin)

    class_abbrevs = list(info["class_abbrevs"])[1:]
    if procs.main:
        atomic_write_text(out / "config.yaml", to_yaml(config))  # also creates the run folder for train.log
    run = Run(
        config=config, out=out, procs=procs, device=device, num_classes=num_classes, class_abbrevs=class_abbrevs,
        small_classes=smallest_classes(counts),
        preprocessing={"size": info.get("size"), "window": window, "patch_size": list(config["patch_size"]),
                       "class_names": list(info["class_names"]), "class_abbrevs": list(info["class_abbrevs"]),
                       "lateral_pairs": info["lateral_pairs"]},
        model=model, step_module=_wrap_step_module(model, config, semi, procs, device), optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=hardware["amp"] and amp_dtype == torch.float16),
        amp=hardware["amp"], amp_dtype=amp_dtype, channels_last=hardware["channels_last"],
        transfer=KnowledgeTransfer(model, parse_ema_order(config["ema_order"]), config["ema_decay"]),
        semi=semi, labeled_loader=labeled_loader, unlabeled_loader=unlabeled_loader,
        unlabeled_has_labels=unlabeled_has_labels, generators=generators, val_loader=val_loader,
        keep_labeled=class_keep_probabilities(counts).to(device), iterations_per_epoch=iterations_per_epoch,
        pseudo_monitor=PseudoLabelMonitor(num_classes, device), log=_open_log(out / "train.log", procs.main),
        writer=None, columns=_metric_columns(class_abbrevs), rows=[])
    if can_resume:
        _restore(run, load_checkpoint(out / "last.pt"))
    if procs.main:
        from torch.utils.tensorboard import SummaryWriter

        run.writer = SummaryWriter(str(out / "tb"), purge_step=run.iteration if can_resume else None)
    return run


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a last.pt: weights, optimiser, counters, random states and the metrics so far."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.start_epoch, run.iteration = state["epoch"], state["iteration"]
    run.best_dice, run.best_epoch = state["best_dice"], state["best_epoch"]
    run.resumed_from_world = len(state["rng"])  # one random state per process of the interrupted run
    _restore_rng_state(state["rng"][run.procs.rank % run.resumed_from_world], run.device, run.generators)
    run.rows = _read_metric_rows(run.out / "metrics.csv", run.start_epoch)


# ----------------------------------------------------------------------------- one epoch

def _to_device(run: Run, x: torch.Tensor) -> torch.Tensor:
    x = x.to(run.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if run.channels_last and x.ndim == 5 else x


def _train_epoch(run: Run, epoch: int, progress: tqdm) -> dict[str, Any]:
    """Run one epoch of training steps; returns its metrics row (schedule, mean loss terms, pseudo-labels)."""
    config, epochs = run.config, run.config["epochs"]
    lr = poly_lr(config["lr"], epoch, epochs, config["lr_power"])
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rampup = epochs if config["rampup_epochs"] is None else config["rampup_epochs"]
    unsup_weight = rampup_weight(config["lambda_u"], epoch, rampup)
    keep_unlabeled = unlabeled_keep_probabilities(run.keep_labeled, epoch, epochs)
    if config["balance_mode"] == "decoupled":
        # blend each balanced head into its main head without the prior of the sample it was trained on
        for step, keep in (("Hl", run.keep_labeled), ("Hu", keep_unlabeled)):
            if step in run.transfer.main_bias:
                run.transfer.set_prior_shift(step, keep.log())
    # summed on the device; synced with the host only when logging
    term_sums = torch.zeros(len(TERMS), device=run.device)
    loss_sum = torch.zeros((), device=run.device)
    # first iteration at which each term was not finite (-1: never)
    first_bad = torch.full((len(TERMS),), -1, dtype=torch.long, device=run.device)
    labeled_batches = _forever(run.labeled_loader)
    unlabeled_batches = _forever(run.unlabeled_loader) if run.semi else None
    run.model.train()
    for _ in range(run.iterations_per_epoch):
        run.transfer.apply()  # knowledge transfer before the forward (SPEC §2)
        batch = next(labeled_batches)
        x_labeled, y_labeled = _to_device(run, batch["image"]), _to_device(run, batch["label"])
        with run.autocast():
            if run.semi:
                unlabeled = next(unlabeled_batches)
                loss, terms, pseudo_labels = semi_supervised_loss(
                    run.step_module, x_labeled, y_labeled, _to_device(run, unlabeled["image"]),
                    unsup_weight=unsup_weight, keep_labeled=run.keep_labeled, keep_unlabeled=keep_unlabeled,
                    balance_mode=config["balance_mode"], pseudo_label_threshold=config["pseudo_label_threshold"])
                true_label = _to_device(run, unlabeled["label"]) if run.unlabeled_has_labels else None
                run.pseudo_monitor.update(pseudo_labels, true_label)
            else:
                loss, terms, _ = supervised_loss(run.step_module, x_labeled, y_labeled,
                                                 keep_labeled=run.keep_labeled, balance_mode=config["balance_mode"])
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.iteration += 1
        term_sums += terms
        loss_sum += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms), run.iteration, first_bad)
        progress.update()
        if run.iteration % config["log_every"] == 0:
            _check_finite(first_bad, run)
            done = run.iteration - epoch * run.iterations_per_epoch
            progress.set_postfix(epoch=epoch, loss=f"{float(loss_sum) / done:.4f}")
    _check_finite(first_bad, run)  # nothing non-finite is ever checkpointed

    terms_by_name = dict(zip(TERMS, (term_sums / run.iterations_per_epoch).tolist()))
    loss_sup = terms_by_name["sup_main"] + terms_by_name["sup_bal"]
    loss_unsup = terms_by_name["unsup_main"] + terms_by_name["unsup_bal"]
    return {"epoch": epoch, "iteration": run.iteration, "lr": lr, "lambda": unsup_weight,
            "loss": loss_sup + unsup_weight * loss_unsup, "loss_sup": loss_sup, "loss_unsup": loss_unsup,
            **{f"loss_{k}": v for k, v in terms_by_name.items()},
            **run.pseudo_monitor.summary(run.unlabeled_has_labels)}


# ----------------------------------------------------------------------------- end of epoch

def _validate(run: Run, row: dict[str, Any]) -> bool:
    """Dice of every head on the validation crops into ``row``; True when the inference head improved."""
    dice = validate_heads(run.model, run.val_loader, run.device, run.num_classes, run.autocast)
    inference_head = f"{run.config['inference_decoder']}_main"
    row["val_dice_mean"] = float(dice[inference_head].mean())
    row.update({f"val_dice_{abbrev}": float(d) for abbrev, d in zip(run.class_abbrevs, dice[inference_head])})
    row.update({f"val_dice_{head}": float(values.mean()) for head, values in dice.items()})
    small = [c - 1 for c in run.small_classes]  # dice holds foreground classes only
    row.update({f"val_dice_small_{head}": float(values[small].mean()) for head, values in dice.items()})
    if row["val_dice_mean"] <= run.best_dice:
        return False
    run.best_dice, run.best_epoch = row["val_dice_mean"], row["epoch"]
    return True


def _log_epoch(run: Run, row: dict[str, Any]) -> None:
    """metrics.csv (rewritten atomically), TensorBoard and one line of train.log."""
    run.rows.append(row)
    _write_metric_rows(run.out / "metrics.csv", run.columns, run.rows)
    for key, value in row.items():
        if key not in ("epoch", "iteration"):
            tag = key.replace("val_dice_", "val_dice/").replace("loss_", "loss/").replace("pseudo_", "pseudo/")
            run.writer.add_scalar(tag, value, run.iteration)
    run.writer.flush()
    message = (f"epoch {row['epoch']}: loss {row['loss']:.4f} (sup {row['loss_sup']:.4f}, "
               f"unsup {row['loss_unsup']:.4f}), lr {row['lr']:.4g}, lambda {row['lambda']:.4g}")
    if "pseudo_dice_main" in row:
        message += f", pseudo-label dice {row['pseudo_dice_main']:.2f}"
    if "val_dice_mean" in row:
        message += f", val dice {row['val_dice_mean']:.2f} (best {run.best_dice:.2f} at epoch {run.best_epoch})"
    run.log.info(message)


def _save(run: Run, improved: bool, rng_states: list[Any]) -> None:
    """best.pt when the validation Dice improved; last.pt every save_every epochs and at the end.

    Written in the background: training waits only for the copy of the state to the CPU.
    """
    from skcdf.checkpoint import FORMAT

    epoch = run.rows[-1]["epoch"]
    payload = {"format": FORMAT, "model_args": run.model.init_args, "model": run.model.state_dict(),
               "preprocessing": run.preprocessing, "config": run.config, "optimizer": run.optimizer.state_dict(),
               "scaler": run.scaler.state_dict(), "epoch": epoch + 1, "iteration": run.iteration,
               "best_dice": run.best_dice, "best_epoch": run.best_epoch, "rng": rng_states}
    paths = [run.out / "best.pt"] if improved else []
    if (epoch + 1) % run.config["save_every"] == 0 or epoch + 1 == run.config["epochs"]:
        paths.append(run.out / "last.pt")
    run.checkpoints.save(payload, paths)


def _end_of_epoch(run: Run, row: dict[str, Any]) -> None:
    """Validation, metrics and checkpoints (rank 0); every rank contributes its random state."""
    epoch, config = row["epoch"], run.config
    validating = run.val_loader is not None and (
        (epoch + 1) % config["val_every"] == 0 or epoch + 1 == config["epochs"])
    improved = _validate(run, row) if validating and run.procs.main else False
    rng_states = _gather(_rng_state(run.device, run.generators), run.procs)
    if run.procs.main:
        _log_epoch(run, row)
        _save(run, improved, rng_states)


# ----------------------------------------------------------------------------- the loop

def train(config: dict[str, Any], data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          resume: bool = False) -> nn.Module:
    """Train the configured variant on the prepared data set ``data_dir``; write the run into ``out_dir``.

    config: a resolved configuration (``skcdf.train.config.load_config`` / ``resolve_config``).
    resume: continue the run in ``out_dir`` from its last.pt (same configuration up to RUNTIME_KEYS).
    Returns the trained model (rank 0's parameters are every rank's). Raises InputError for bad
    configurations or data (before any work) and TrainingDiverged when a loss term stops being finite.
    """
    procs, started_processes = _start_processes()
    run = None
    try:
        run = _set_up(config, Path(data_dir), Path(out_dir), resume, procs)
        epochs = config["epochs"]
        if run.start_epoch >= epochs:
            run.log.info(f"{run.out}: the run already finished ({epochs} epochs); nothing to do")
            return run.model
        _log_start(run)
        progress = tqdm(total=epochs * run.iterations_per_epoch, initial=run.iteration, desc="train",
                        disable=not procs.main, dynamic_ncols=True)
        with run.checkpoints:  # the last write has finished before train() returns or raises
            for epoch in range(run.start_epoch, epochs):
                row = _train_epoch(run, epoch, progress)
                _end_of_epoch(run, row)
        progress.close()
        run.log.info(f"finished {epochs} epochs" + (f"; best val dice {run.best_dice:.2f} at epoch {run.best_epoch}"
                                                     if run.best_epoch >= 0 else ""))
        return run.model
    except TrainingDiverged as exc:
        run.log.error(str(exc))
        raise
    finally:
        if run is not None:
            if run.writer is not None:
                run.writer.close()
            _close_log(run.log)
        if started_processes:
            dist.destroy_process_group()


def _log_start(run: Run) -> None:
    resuming = run.resumed_from_world is not None
    if resuming and run.resumed_from_world != run.procs.world:
        run.log.warning(f"resuming a run of {run.resumed_from_world} process(es) with {run.procs.world}: the data "
                        "order and random draws will differ from those of an uninterrupted run")
    unlabeled = len(run.unlabeled_loader.dataset) if run.semi else 0
    labeled = len(run.labeled_loader.dataset)
    precision = f"{str(run.amp_dtype).removeprefix('torch.')} autocast" if run.amp else "fp32"
    run.log.info(f"{'resuming at' if resuming else 'starting'} epoch {run.start_epoch}: variant {run.config['variant']}, "
                 f"{labeled} labeled / {unlabeled} unlabeled cases, {run.iterations_per_epoch} iterations per epoch, "
                 f"{run.procs.world} process(es) on {run.device} ({precision}"
                 f"{', channels_last_3d' if run.channels_last else ''})")
    if not shards_labeled_cases(labeled, run.config["batch_labeled"], run.procs.world):
        run.log.info(f"{labeled} labeled cases are too few to shard across {run.procs.world} processes at "
                     f"batch_labeled {run.config['batch_labeled']}: each process draws its labeled batches from "
                     "all of them, in its own order (seed + rank)")


def _check_finite(first_bad: torch.Tensor, run: Run) -> None:
    """Raise TrainingDiverged naming the first iteration and loss term that were not finite.

    first_bad (4,): per loss term, the first iteration at which it was not finite, -1 if none. Under
    torchrun the ranks agree first (earliest bad iteration over ranks), so that they all stop together.
    """
    if run.procs.world > 1:
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(first_bad < 0, never, first_bad)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = torch.where(first_bad == never, -1, first_bad)
    bad = first_bad.tolist()
    if max(bad) < 0:
        return
    iteration = min(i for i in bad if i >= 0)
    term = TERMS[bad.index(iteration)]
    run.checkpoints.wait()  # the last good checkpoint may still be being written
    kept = run.out / "last.pt"
    raise TrainingDiverged(f"loss term {term} is NaN or infinite at iteration {iteration}; training stopped. "
                           + (f"The last good checkpoint is {kept}." if kept.exists() else "No checkpoint was written."))
