"""The training loop: one readable file, no framework (in the spirit of nanoGPT's train.py).

``train(config, data_dir, out_dir, resume=False)``, at the end of this file, trains any method of
:mod:`skcdf.methods` and writes the run folder (config.yaml, last.pt, best.pt, metrics.csv, train.log,
tb/). It reads top to bottom: set-up (:func:`_set_up`), the loop over epochs (:func:`_train_epoch`),
and the end of each epoch (:func:`_end_of_epoch`: validation, metrics, checkpoints). What is trained
lives in :mod:`skcdf.train.networks`, the data streams in :mod:`skcdf.train.streams`, the run folder's
bookkeeping in :mod:`skcdf.train.run_folder`, the loss of one iteration in :mod:`skcdf.train.step`.

Reproducibility: the global RNGs are seeded once (seed + rank), each data stream has its own generators,
all are checkpointed at epoch boundaries and every epoch starts fresh data iterators: a resumed run
continues exactly where the interrupted one was (bit for bit on CPU). Under ``torchrun`` each process
trains on its shard of both streams with DistributedDataParallel (the SKCM's cross attention stays
within each rank's [X_L; X_U]); only rank 0 validates and writes, checkpoints in the background.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from skcdf import device as devices
from skcdf.checkpoint import FORMAT, CheckpointWriter, load_checkpoint
from skcdf.data.layout import read_dataset_info
from skcdf.methods.plugin import Context, MethodTraining
from skcdf.train import networks, run_folder
from skcdf.train.balance import class_keep_probabilities, smallest_classes, unlabeled_keep_probabilities
from skcdf.train.config import Config, resolve_config, to_yaml
from skcdf.train.knowledge_transfer import KnowledgeTransfer, parse_ema_order
from skcdf.train.monitor import PseudoLabelMonitor, validate_heads
from skcdf.train.processes import Processes, gather, start_processes
from skcdf.train.schedules import poly_lr, rampup_weight
from skcdf.train.step import TERMS, semi_supervised_loss, supervised_loss
from skcdf.train.data_options import preprocessing as checkpoint_preprocessing
from skcdf.train.streams import TrainingData, class_counts, open_streams, select_cases, shards_labeled_cases
from skcdf.utils import atomic_write_text

class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; the message names the iteration and the term."""


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`_set_up` (fresh or from last.pt)."""

    config: Config
    out: Path
    procs: Processes
    device: torch.device
    num_classes: int
    amp: bool                                   # autocast on: config amp, "auto" resolved for the device
    channels_last: bool                         # channels_last_3d model and inputs, "auto" resolved likewise
    class_abbrevs: list[str]                    # foreground classes, for the metric columns
    small_classes: list[int]                    # the 6 smallest classes (by n_c), for val_dice_small_<head>
    preprocessing: dict[str, Any]               # stored in checkpoints for `skcdf predict`
    model: nn.Module                            # SKCDFNet, or a Table 1 method's MethodNet
    step_module: nn.Module                      # what the step calls: model, TwoFlowForward, DDP or compiled
    optimizer: torch.optim.Optimizer
    plugin: MethodTraining | None               # a Table 1 method's own step and state (skcdf.methods.plugin)
    scaler: torch.amp.GradScaler
    transfer: KnowledgeTransfer
    data: TrainingData
    keep_labeled: torch.Tensor                  # (K,) balanced-mask keep probabilities p
    pseudo_monitor: PseudoLabelMonitor
    log: logging.Logger
    columns: list[str]                          # of metrics.csv
    rows: list[dict[str, Any]] = field(default_factory=list)
    writer: SummaryWriter | None = None         # TensorBoard, rank 0 only
    checkpoints: CheckpointWriter = field(default_factory=CheckpointWriter)  # writes in the background
    resumed_from_world: int | None = None       # process count of the interrupted run, when resuming
    start_epoch: int = 0
    iteration: int = 0
    best_dice: float = -math.inf
    best_epoch: int = -1

    def autocast(self) -> torch.autocast:
        return devices.autocast(self.device, self.amp)


# ----------------------------------------------------------------------------- set-up

def _set_up(config: Config, root: Path, out: Path, resume: bool, procs: Processes) -> Run:
    """Check the input (before any work), build model, optimiser and data streams, restore last.pt."""
    device = devices.resolve_device(config.device, procs.local_rank)
    hardware = devices.hardware_settings(config.amp, config.channels_last, device.type)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives use the current device
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels once
    info = read_dataset_info(root)
    num_classes = int(info["num_classes"])
    cases = select_cases(config, root, procs)
    counts = class_counts(config, root, cases.labeled, num_classes)
    can_resume = run_folder.check_run_folder(out, config, resume)
    if procs.world > 1:
        dist.barrier()  # every rank has read the folder before rank 0 writes into it

    random.seed(config.seed + procs.rank)
    np.random.seed(config.seed + procs.rank)
    torch.manual_seed(config.seed + procs.rank)
    model = networks.build_model(config, num_classes, procs, device, hardware["channels_last"])
    table1 = config.method.plugin  # a Table 1 method: its own networks and step (skcdf.methods.plugin)
    optimizer = networks.new_optimizer(config, model.networks[model.recipe.trained] if table1 else model)
    data = open_streams(config, root, info, cases, procs, pin_memory=device.type == "cuda")
    plugin = None
    if table1:
        context = Context(num_classes, tuple(config.patch_size), torch.as_tensor(counts), len(cases.unlabeled),
                          config.batch_unlabeled, data.iterations_per_epoch, config.rampup_epochs or config.epochs,
                          config.method_weight, functools.partial(networks.new_optimizer, config), device)
        plugin = MethodTraining(model, optimizer, context)
        if devices.amp_dtype(device) == torch.float16:
            hardware["amp"] = False  # the Table 1 steps have no loss scaler: float16 would underflow
    if procs.main:
        atomic_write_text(out / "config.yaml", to_yaml(config))  # also creates the run folder for train.log
    class_abbrevs = list(info["class_abbrevs"])[1:]
    run = Run(
        config=config, out=out, procs=procs, device=device, num_classes=num_classes, amp=hardware["amp"],
        channels_last=hardware["channels_last"], class_abbrevs=class_abbrevs, small_classes=smallest_classes(counts),
        preprocessing=checkpoint_preprocessing(config, info),
        model=model, step_module=networks.step_module(model, config, procs, device), optimizer=optimizer,
        plugin=plugin,
        scaler=torch.amp.GradScaler(device.type, enabled=hardware["amp"] and devices.amp_dtype(device) == torch.float16),
        transfer=KnowledgeTransfer(model, parse_ema_order(config.ema_order), config.ema_decay),
        data=data, keep_labeled=class_keep_probabilities(counts).to(device),
        pseudo_monitor=PseudoLabelMonitor(num_classes, device),
        log=run_folder.open_log(out / "train.log", procs.main),
        columns=run_folder.metric_columns(class_abbrevs, plugin.recipe.terms if plugin else TERMS))
    if can_resume:
        _restore(run, load_checkpoint(out / "last.pt"))
    if procs.main:
        run.writer = SummaryWriter(str(out / "tb"), purge_step=run.iteration if can_resume else None)
    return run


def _restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a last.pt: weights, optimiser, counters, random states and the metrics so far."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if run.plugin is not None:
        run.plugin.load_state_dict(state["method_state"])
    run.start_epoch, run.iteration = state["epoch"], state["iteration"]
    run.best_dice, run.best_epoch = state["best_dice"], state["best_epoch"]
    run.resumed_from_world = len(state["rng"])  # one random state per process of the interrupted run
    run_folder.restore_rng_state(state["rng"][run.procs.rank % run.resumed_from_world], run.device,
                                 run.data.generators)
    run.rows = run_folder.read_metric_rows(run.out / "metrics.csv", run.start_epoch)


def _log_start(run: Run) -> None:
    resuming = run.resumed_from_world is not None
    if resuming and run.resumed_from_world != run.procs.world:
        run.log.warning(f"resuming a run of {run.resumed_from_world} process(es) with {run.procs.world}: the data "
                        "order and random draws will differ from those of an uninterrupted run")
    unlabeled = len(run.data.unlabeled.dataset) if run.data.unlabeled is not None else 0
    labeled = len(run.data.labeled.dataset)
    precision = devices.describe_precision(run.device, run.amp, run.channels_last, run.config.amp)
    run.log.info(f"{'resuming at' if resuming else 'starting'} epoch {run.start_epoch}: variant {run.config.variant}, "
                 f"{labeled} labeled / {unlabeled} unlabeled cases, {run.data.iterations_per_epoch} iterations per "
                 f"epoch, {run.procs.world} process(es) on {run.device} ({precision})")
    if not shards_labeled_cases(labeled, run.config.batch_labeled, run.procs.world):
        run.log.info(f"{labeled} labeled cases are too few to shard across {run.procs.world} processes at "
                     f"batch_labeled {run.config.batch_labeled}: each process draws its labeled batches from "
                     "all of them, in its own order (seed + rank)")


# ----------------------------------------------------------------------------- one epoch

def _to_device(run: Run, x: torch.Tensor) -> torch.Tensor:
    x = x.to(run.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if run.channels_last and x.ndim == 5 else x


def _train_epoch(run: Run, epoch: int, progress: tqdm) -> dict[str, Any]:
    """Run one epoch of training steps; returns its metrics row (schedule, mean loss terms, pseudo-labels)."""
    if run.plugin is not None:
        return _train_plugin_epoch(run, epoch, progress)
    config, data, epochs = run.config, run.data, run.config.epochs
    lr = poly_lr(config.lr, epoch, epochs, config.lr_power)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rampup = epochs if config.rampup_epochs is None else config.rampup_epochs
    unsup_weight = rampup_weight(config.lambda_u, epoch, rampup)
    keep_unlabeled = unlabeled_keep_probabilities(run.keep_labeled, epoch, epochs)
    if config.balance_mode == "decoupled":
        # blend each balanced head into its main head without the prior of the sample it was trained on
        for step, keep in (("Hl", run.keep_labeled), ("Hu", keep_unlabeled)):
            if step in run.transfer.main_bias:
                run.transfer.set_prior_shift(step, keep.log())
    # summed on the device; synced with the host only when logging
    term_sums = torch.zeros(len(TERMS), device=run.device)
    loss_sum = torch.zeros((), device=run.device)
    # first iteration at which each term was not finite (-1: never)
    first_bad = torch.full((len(TERMS),), -1, dtype=torch.long, device=run.device)
    labeled_batches, unlabeled_batches = data.batches()  # fresh iterators every epoch
    run.model.train()
    for _ in range(data.iterations_per_epoch):
        run.transfer.apply()  # knowledge transfer before the forward (SPEC §2)
        batch = next(labeled_batches)
        x_labeled, y_labeled = _to_device(run, batch["image"]), _to_device(run, batch["label"])
        with run.autocast():
            if config.method.semi:
                unlabeled = next(unlabeled_batches)
                loss, terms, pseudo_labels = semi_supervised_loss(
                    run.step_module, x_labeled, y_labeled, _to_device(run, unlabeled["image"]),
                    unsup_weight=unsup_weight, keep_labeled=run.keep_labeled, keep_unlabeled=keep_unlabeled,
                    balance_mode=config.balance_mode, pseudo_label_threshold=config.pseudo_label_threshold)
                true_label = _to_device(run, unlabeled["label"]) if data.unlabeled_has_labels else None
                run.pseudo_monitor.update(pseudo_labels, true_label)
            else:
                loss, terms, _ = supervised_loss(run.step_module, x_labeled, y_labeled,
                                                 keep_labeled=run.keep_labeled, balance_mode=config.balance_mode)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.iteration += 1
        term_sums += terms
        loss_sum += loss.detach()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms), run.iteration, first_bad)
        progress.update()
        if run.iteration % config.log_every == 0:
            _check_finite(first_bad, run)
            done = run.iteration - epoch * data.iterations_per_epoch
            progress.set_postfix(epoch=epoch, loss=f"{float(loss_sum) / done:.4f}")
    _check_finite(first_bad, run)  # nothing non-finite is ever checkpointed

    terms_by_name = dict(zip(TERMS, (term_sums / data.iterations_per_epoch).tolist()))
    loss_sup = terms_by_name["sup_main"] + terms_by_name["sup_bal"]
    loss_unsup = terms_by_name["unsup_main"] + terms_by_name["unsup_bal"]
    return {"epoch": epoch, "iteration": run.iteration, "lr": lr, "lambda": unsup_weight,
            "loss": loss_sup + unsup_weight * loss_unsup, "loss_sup": loss_sup, "loss_unsup": loss_unsup,
            **{f"loss_{k}": v for k, v in terms_by_name.items()},
            **run.pseudo_monitor.summary(data.unlabeled_has_labels)}


def _train_plugin_epoch(run: Run, epoch: int, progress: tqdm) -> dict[str, Any]:
    """One epoch of a Table 1 method: its step runs the forwards, the backward and every optimiser's step."""
    config, data = run.config, run.data
    lr = poly_lr(config.lr, epoch, config.epochs, config.lr_power)
    run.plugin.set_lr(lr)
    sums: dict[str, float] = {}
    labeled_batches, unlabeled_batches = data.batches()  # fresh iterators every epoch
    for _ in range(data.iterations_per_epoch):
        labeled = next(labeled_batches)
        x_unlabeled = labeled["image"][:0] if unlabeled_batches is None else next(unlabeled_batches)["image"]
        with run.autocast():
            terms = run.plugin.step(_to_device(run, labeled["image"]), _to_device(run, labeled["label"]),
                                    _to_device(run, x_unlabeled), epoch)
        run.iteration += 1
        for name, value in terms.items():  # the step synced them to floats already
            if not math.isfinite(value):
                _diverged(run, name, run.iteration)
            sums[name] = sums.get(name, 0.0) + value
        progress.update()
        if run.iteration % config.log_every == 0:
            progress.set_postfix(epoch=epoch, loss=f"{terms[run.plugin.recipe.total]:.4f}")
    means = {name: total / data.iterations_per_epoch for name, total in sums.items()}
    return {"epoch": epoch, "iteration": run.iteration, "lr": lr, **run.plugin.summary(means),
            **{f"loss_{name}": value for name, value in means.items()}}


def _check_finite(first_bad: torch.Tensor, run: Run) -> None:
    """Raise TrainingDiverged naming the first iteration and loss term that were not finite.

    first_bad (len(TERMS),): per loss term, the first iteration at which it was not finite, -1 if
    none. Under torchrun the ranks agree first (earliest bad iteration over ranks), so that they all
    stop together.
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
    _diverged(run, TERMS[bad.index(iteration)], iteration)


def _diverged(run: Run, term: str, iteration: int) -> None:
    """Raise TrainingDiverged once the last good checkpoint is on disk."""
    run.checkpoints.wait()  # the last good checkpoint may still be being written
    kept = run.out / "last.pt"
    raise TrainingDiverged(f"loss term {term} is NaN or infinite at iteration {iteration}; training stopped. "
                           + (f"The last good checkpoint is {kept}." if kept.exists() else "No checkpoint was written."))


# ----------------------------------------------------------------------------- end of epoch

def _validate(run: Run, row: dict[str, Any]) -> bool:
    """Dice of every head on the validation cases into ``row``; True when the inference head improved."""
    window = run.config.patch_size if run.config.val_region == "whole" else None
    dice = validate_heads(run.model, run.data.validation, run.device, run.num_classes, run.autocast, window,
                          decoder_mean=run.config.inference_decoder == "mean", pad_value=run.data.background)
    inference = dice.pop("mean_main") if "mean_main" in dice else dice[f"{run.config.inference_decoder}_main"]
    row["val_dice_mean"] = float(inference.mean())
    row.update({f"val_dice_{abbrev}": float(d) for abbrev, d in zip(run.class_abbrevs, inference)})
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
    run_folder.write_metric_rows(run.out / "metrics.csv", run.columns, run.rows)
    run_folder.write_scalars(run.writer, row, run.iteration)
    run.log.info(run_folder.epoch_message(row, run.best_dice, run.best_epoch))


def _save(run: Run, improved: bool, rng_states: list[Any]) -> None:
    """best.pt when the validation Dice improved; last.pt every save_every epochs and at the end.

    Written in the background: training waits only for the copy of the state to the CPU.
    """
    epoch = run.rows[-1]["epoch"]
    payload = {"format": FORMAT, "model_args": run.model.init_args, "model": run.model.state_dict(),
               "preprocessing": run.preprocessing, "config": run.config.to_dict(),
               "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(), "epoch": epoch + 1,
               "iteration": run.iteration, "best_dice": run.best_dice, "best_epoch": run.best_epoch, "rng": rng_states}
    if run.plugin is not None:
        payload["method_state"] = run.plugin.state_dict()
    paths = [run.out / "best.pt"] if improved else []
    if (epoch + 1) % run.config.save_every == 0 or epoch + 1 == run.config.epochs:
        paths.append(run.out / "last.pt")
    run.checkpoints.save(payload, paths)


def _end_of_epoch(run: Run, row: dict[str, Any]) -> None:
    """Validation, metrics and checkpoints (rank 0); every rank contributes its random state."""
    epoch, config = row["epoch"], run.config
    validating = run.data.validation is not None and (
        (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs)
    improved = _validate(run, row) if validating and run.procs.main else False
    rng_states = gather(run_folder.rng_state(run.device, run.data.generators), run.procs)
    if run.procs.main:
        _log_epoch(run, row)
        _save(run, improved, rng_states)


# ----------------------------------------------------------------------------- the loop

def train(config: Config | Mapping[str, Any], data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          resume: bool = False) -> nn.Module:
    """Train the configured method on the prepared data set ``data_dir``; write the run into ``out_dir``.

    config: a configuration (``skcdf.train.config.load_config``); a mapping of keys is resolved first.
    resume: continue the run in ``out_dir`` from its last.pt (same configuration up to RUNTIME_KEYS).
    Returns the trained model (rank 0's parameters are every rank's). Raises InputError for bad
    configurations or data (before any work) and TrainingDiverged when a loss term stops being finite.
    """
    if not isinstance(config, Config):
        config = resolve_config(config)
    procs, started_processes = start_processes()
    run = None
    try:
        run = _set_up(config, Path(data_dir), Path(out_dir), resume, procs)
        if run.start_epoch >= config.epochs:
            run.log.info(f"{run.out}: the run already finished ({config.epochs} epochs); nothing to do")
            return run.model
        _log_start(run)
        progress = tqdm(total=config.epochs * run.data.iterations_per_epoch, initial=run.iteration, desc="train",
                        disable=not procs.main, dynamic_ncols=True)
        with run.checkpoints:  # the last write has finished before train() returns or raises
            for epoch in range(run.start_epoch, config.epochs):
                row = _train_epoch(run, epoch, progress)
                _end_of_epoch(run, row)
        progress.close()
        run.log.info(f"finished {config.epochs} epochs" + (
            f"; best val dice {run.best_dice:.2f} at epoch {run.best_epoch}" if run.best_epoch >= 0 else ""))
        return run.model
    except TrainingDiverged as exc:
        run.log.error(str(exc))
        raise
    finally:
        if run is not None:
            if run.writer is not None:
                run.writer.close()
            run_folder.close_log(run.log)
        if started_processes:
            dist.destroy_process_group()
