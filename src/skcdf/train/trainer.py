"""The training loop: one readable file, no framework (in the spirit of nanoGPT's train.py).

``train(config, data_dir, out_dir, resume=False)`` trains any variant of SPEC §3 and writes the run
folder: config.yaml, last.pt, best.pt, metrics.csv, train.log and tb/ (TensorBoard).

Reproducibility: the global RNGs are seeded once (seed + rank); each data stream (labeled,
unlabeled) has its own torch.Generator that drives both its shuffling and its workers' seeds. All of
them are checkpointed at epoch boundaries, and every epoch starts fresh data iterators, so a resumed
run continues exactly where the interrupted one was (bit for bit on CPU).

Multi-GPU: under ``torchrun`` each process trains on its shard of both streams with
DistributedDataParallel; the SKCM's cross attention stays within each rank's own [X_L; X_U]. Only
rank 0 validates and writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from skcdf.train.balance import class_keep_probabilities, unlabeled_keep_probabilities
from skcdf.train.config import DEFAULTS, RUNTIME_KEYS, step_kind, to_yaml
from skcdf.train.knowledge_transfer import KnowledgeTransfer, parse_ema_order
from skcdf.train.step import LOSS_TERMS, TwoFlowForward, semi_supervised_loss, supervised_loss
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

class ShardedRandomSampler(Sampler[int]):
    """A fresh random permutation per pass, this rank's share of it (DistributedSampler's scheme).

    Driven by ``generator``, which every rank seeds identically so that the shards are disjoint, and
    which is checkpointed so that a resumed run draws the same permutations.
    """

    def __init__(self, size: int, generator: torch.Generator, rank: int = 0, world: int = 1) -> None:
        self.size, self.generator, self.rank, self.world = size, generator, rank, world

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=self.generator)
        return iter(order[self.rank: len(self) * self.world: self.world].tolist())


def _stream_seed(seed: int, stream: str, rank: int | None = None) -> int:
    """A well-mixed 63-bit seed for one data stream (and rank, for its workers' augmentation)."""
    keys = [seed, {"labeled": 1, "unlabeled": 2}[stream]] + ([] if rank is None else [rank + 1])
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0] >> 1)


def _make_stream(root: Path, cases: list[str], config: dict, window: Any, with_labels: bool,
                 stream: str, procs: Processes, pin_memory: bool) -> tuple[DataLoader, dict[str, torch.Generator]]:
    """Training loader of random patches; returns it with the generators that determine it."""
    from skcdf.data.loaders import PatchDataset

    order = torch.Generator().manual_seed(_stream_seed(config["seed"], stream))
    workers = torch.Generator().manual_seed(_stream_seed(config["seed"], stream, procs.rank))
    dataset = PatchDataset(root, cases, tuple(config["patch_size"]), with_labels=with_labels,
                           window=window, flips=True)
    batch = config["batch_labeled" if with_labels else "batch_unlabeled"]
    loader = DataLoader(dataset, batch_size=batch, drop_last=True, num_workers=config["num_workers"],
                        sampler=ShardedRandomSampler(len(cases), order, procs.rank, procs.world),
                        generator=workers, pin_memory=pin_memory)
    return loader, {f"{stream}_order": order, f"{stream}_workers": workers}


def _forever(loader: DataLoader) -> Iterator[dict]:
    """Batches of ``loader`` pass after pass (the smaller labeled set is cycled to match the epoch)."""
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
    for cases, batch_key in ((labeled, "batch_labeled"), (unlabeled, "batch_unlabeled")):
        if len(cases) // procs.world < config[batch_key]:
            raise InputError(f"{batch_key}: {config[batch_key]} per step x {procs.world} process(es) needs at least "
                             f"{config[batch_key] * procs.world} cases, the split has {len(cases)}")
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
    changed = [f"{key}: {previous.get(key)!r} -> {config.get(key)!r}" for key in DEFAULTS
               if key not in RUNTIME_KEYS and previous.get(key) != config.get(key)]
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
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))

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


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate(model: nn.Module, dataset: Any, decoder: str, device: torch.device,
             num_classes: int, autocast: Any = contextlib.nullcontext) -> np.ndarray:
    """Per-class hard Dice (%) averaged over the validation cases, classes 1..K-1. (K-1,)

    dataset items: {"image": (1,D,H,W) float, "label": (D,H,W) int64}, centre crops of the patch size.
    decoder: "unlabeled" (D_u main head, the paper's choice) or "labeled" (D_l, cross mode paired with itself).
    """
    from skcdf.metrics import dice_per_class

    was_training = model.training
    model.eval()
    scores = []
    for item in dataset:
        image = item["image"].unsqueeze(0).to(device)
        with autocast():
            logits = model(image, flow="unlabeled")[0] if decoder == "unlabeled" else model.forward_labeled_decoder(image)[0]
        prediction = logits.argmax(1)[0].cpu().numpy()
        scores.append(dice_per_class(prediction, item["label"].numpy(), range(1, num_classes)))
    model.train(was_training)
    return np.mean(scores, axis=0)


# ----------------------------------------------------------------------------- the loop

def train(config: dict[str, Any], data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          resume: bool = False) -> nn.Module:
    """Train the configured variant on the prepared data set ``data_dir``; write the run into ``out_dir``.

    config: a resolved configuration (``skcdf.train.config.load_config`` / ``resolve_config``).
    resume: continue the run in ``out_dir`` from its last.pt (same configuration up to RUNTIME_KEYS).
    Returns the trained model (rank 0's parameters are every rank's). Raises InputError for bad
    configurations or data (before any work) and TrainingDiverged when a loss term stops being finite.
    """
    from skcdf.checkpoint import FORMAT, load_checkpoint, save_checkpoint
    from skcdf.data.layout import read_dataset_info
    from skcdf.data.loaders import CenterCropDataset
    from skcdf.nn import SKCDFNet

    root, out = Path(data_dir), Path(out_dir)
    procs, started_processes = _start_processes()
    try:
        # --- everything that can be wrong with the input is checked before any work
        device = resolve_device(config["device"], procs.local_rank)
        if config["amp"] and device.type != "cuda":
            raise InputError(f"amp (mixed precision) needs a CUDA device, the run uses {device}")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL collectives use the current device
            torch.backends.cudnn.benchmark = True  # fixed patch shapes: pick the fastest kernels once
        info = read_dataset_info(root)
        num_classes = int(info["num_classes"])
        labeled_cases, unlabeled_cases, val_cases = _select_cases(config, root, procs)
        counts = _class_counts(config, root, labeled_cases, num_classes)
        iterations_per_epoch = config["iterations_per_epoch"] or len(unlabeled_cases) // (config["batch_unlabeled"] * procs.world)
        can_resume = _check_run_folder(out, config, resume)
        if procs.world > 1:
            dist.barrier()  # every rank has read the folder before rank 0 writes into it

        # --- model, optimiser, data streams
        random.seed(config["seed"] + procs.rank)
        np.random.seed(config["seed"] + procs.rank)
        torch.manual_seed(config["seed"] + procs.rank)
        model = SKCDFNet(in_channels=1, num_classes=num_classes, filters=config["filters"],
                         patch_size=config["patch_size"], num_heads=config["num_heads"], skcm=config["skcm"],
                         shared_decoder=config["shared_decoder"], aux_heads=config["aux_heads"],
                         dropout=config["dropout"])
        if procs.world > 1 and config["sync_batchnorm"]:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        if config["channels_last"]:
            model.to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=config["momentum"],
                                    nesterov=config["nesterov"], weight_decay=config["weight_decay"])
        transfer = KnowledgeTransfer(model, parse_ema_order(config["ema_order"]), config["ema_decay"])
        semi = step_kind(config) == "semi"
        step_module: nn.Module = TwoFlowForward(model) if semi else model
        if procs.world > 1:
            step_module = nn.parallel.DistributedDataParallel(
                step_module, device_ids=[device.index] if device.type == "cuda" else None,
                # labeled_only/fully_supervised with two decoders never touch D_l
                find_unused_parameters=not semi and not config["shared_decoder"])
        if config["compile"]:
            step_module = torch.compile(step_module)
        amp_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(device.type, enabled=config["amp"] and amp_dtype == torch.float16)

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=amp_dtype, enabled=config["amp"])

        window = info.get("window")
        pin = device.type == "cuda"
        labeled_loader, generators = _make_stream(root, labeled_cases, config, window, True, "labeled", procs, pin)
        unlabeled_loader = None
        if semi:
            unlabeled_loader, unlabeled_generators = _make_stream(
                root, unlabeled_cases, config, window, False, "unlabeled", procs, pin)
            generators.update(unlabeled_generators)
        val_dataset = CenterCropDataset(root, val_cases, tuple(config["patch_size"]), window=window) if val_cases else None
        keep_labeled = class_keep_probabilities(counts).to(device)

        # --- state: fresh or from last.pt
        start_epoch, iteration, best_dice, best_epoch = 0, 0, -math.inf, -1
        if can_resume:
            state = load_checkpoint(out / "last.pt")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, iteration = state["epoch"], state["iteration"]
            best_dice, best_epoch = state["best_dice"], state["best_epoch"]
            saved_world = len(state["rng"])  # one random state per process of the interrupted run
            _restore_rng_state(state["rng"][procs.rank % saved_world], device, generators)
        class_abbrevs = list(info["class_abbrevs"])[1:]
        columns = (["epoch", "iteration", "lr", "lambda", "loss", "loss_sup", "loss_unsup"]
                   + [f"loss_{term}" for term in LOSS_TERMS]
                   + ["val_dice_mean"] + [f"val_dice_{abbrev}" for abbrev in class_abbrevs])
        rows = _read_metric_rows(out / "metrics.csv", start_epoch) if can_resume else []
        if procs.main:
            atomic_write_text(out / "config.yaml", to_yaml(config))
        log = _open_log(out / "train.log", procs.main)
        writer = None
        if procs.main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / "tb"), purge_step=iteration if can_resume else None)
    except BaseException:
        if started_processes:
            dist.destroy_process_group()
        raise

    epochs = config["epochs"]
    rampup = epochs if config["rampup_epochs"] is None else config["rampup_epochs"]
    preprocessing = {"size": info.get("size"), "window": window, "patch_size": list(config["patch_size"]),
                     "class_names": list(info["class_names"]), "class_abbrevs": list(info["class_abbrevs"])}
    try:
        if start_epoch >= epochs:
            log.info(f"{out}: the run already finished ({epochs} epochs); nothing to do")
            return model
        if can_resume and saved_world != procs.world:
            log.warning(f"resuming a run of {saved_world} process(es) with {procs.world}: the data order and "
                        "random draws will differ from those of an uninterrupted run")
        log.info(f"{'resuming at' if can_resume else 'starting'} epoch {start_epoch}: variant {config['variant']}, "
                 f"{len(labeled_cases)} labeled / {len(unlabeled_cases) if semi else 0} unlabeled cases, "
                 f"{iterations_per_epoch} iterations per epoch, {procs.world} process(es) on {device}")
        progress = tqdm(total=epochs * iterations_per_epoch, initial=iteration, desc="train",
                        disable=not procs.main, dynamic_ncols=True)
        for epoch in range(start_epoch, epochs):
            lr = poly_lr(config["lr"], epoch, epochs, config["lr_power"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            unsup_weight = rampup_weight(config["lambda_u"], epoch, rampup)
            keep_unlabeled = unlabeled_keep_probabilities(keep_labeled, epoch, epochs)
            term_sums = torch.zeros(len(LOSS_TERMS), device=device)
            loss_sum = torch.zeros((), device=device)
            # first iteration at which each term was not finite (-1: never); checked when we sync anyway
            first_bad = torch.full((len(LOSS_TERMS),), -1, dtype=torch.long, device=device)
            labeled_batches = _forever(labeled_loader)
            unlabeled_batches = _forever(unlabeled_loader) if semi else None
            model.train()
            for _ in range(iterations_per_epoch):
                transfer.apply()  # knowledge transfer before the forward (SPEC §2)
                batch = next(labeled_batches)
                x_labeled = batch["image"].to(device, non_blocking=True)
                y_labeled = batch["label"].to(device, non_blocking=True)
                if config["channels_last"]:
                    x_labeled = x_labeled.contiguous(memory_format=torch.channels_last_3d)
                with autocast():
                    if semi:
                        x_unlabeled = next(unlabeled_batches)["image"].to(device, non_blocking=True)
                        if config["channels_last"]:
                            x_unlabeled = x_unlabeled.contiguous(memory_format=torch.channels_last_3d)
                        loss, terms = semi_supervised_loss(
                            step_module, x_labeled, y_labeled, x_unlabeled, unsup_weight=unsup_weight,
                            keep_labeled=keep_labeled, keep_unlabeled=keep_unlabeled,
                            balance_mode=config["balance_mode"])
                    else:
                        loss, terms = supervised_loss(step_module, x_labeled, y_labeled, keep_labeled=keep_labeled,
                                                      balance_mode=config["balance_mode"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                iteration += 1
                term_sums += terms
                loss_sum += loss.detach()
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(terms), iteration, first_bad)
                progress.update()
                if iteration % config["log_every"] == 0:
                    _check_finite(first_bad, out, procs)
                    done = iteration - epoch * iterations_per_epoch
                    progress.set_postfix(epoch=epoch, loss=f"{float(loss_sum) / done:.4f}")
            _check_finite(first_bad, out, procs)  # nothing non-finite is ever checkpointed

            # --- end of epoch: metrics, validation, checkpoints
            mean_terms = (term_sums / iterations_per_epoch).tolist()
            terms_by_name = dict(zip(LOSS_TERMS, mean_terms))
            loss_sup = terms_by_name["sup_main"] + terms_by_name["sup_bal"]
            loss_unsup = terms_by_name["unsup_main"] + terms_by_name["unsup_bal"]
            row: dict[str, Any] = {"epoch": epoch, "iteration": iteration, "lr": lr, "lambda": unsup_weight,
                                   "loss": loss_sup + unsup_weight * loss_unsup, "loss_sup": loss_sup,
                                   "loss_unsup": loss_unsup, **{f"loss_{k}": v for k, v in terms_by_name.items()}}
            validating = val_dataset is not None and ((epoch + 1) % config["val_every"] == 0 or epoch + 1 == epochs)
            improved = False
            if validating and procs.main:
                dice = validate(model, val_dataset, config["inference_decoder"], device, num_classes, autocast)
                row["val_dice_mean"] = float(dice.mean())
                row.update({f"val_dice_{abbrev}": float(d) for abbrev, d in zip(class_abbrevs, dice)})
                improved = row["val_dice_mean"] > best_dice
                if improved:
                    best_dice, best_epoch = row["val_dice_mean"], epoch
            rng_states = _gather(_rng_state(device, generators), procs)
            if not procs.main:
                continue
            rows.append(row)
            _write_metric_rows(out / "metrics.csv", columns, rows)
            for key, value in row.items():
                if key not in ("epoch", "iteration"):
                    writer.add_scalar(key.replace("val_dice_", "val_dice/").replace("loss_", "loss/"), value, iteration)
            writer.flush()
            message = (f"epoch {epoch}: loss {row['loss']:.4f} (sup {loss_sup:.4f}, unsup {loss_unsup:.4f}), "
                       f"lr {lr:.4g}, lambda {unsup_weight:.4g}")
            if "val_dice_mean" in row:
                message += f", val dice {row['val_dice_mean']:.2f} (best {best_dice:.2f} at epoch {best_epoch})"
            log.info(message)
            payload = {"format": FORMAT, "model_args": model.init_args, "model": model.state_dict(),
                       "preprocessing": preprocessing, "config": config, "optimizer": optimizer.state_dict(),
                       "scaler": scaler.state_dict(), "epoch": epoch + 1, "iteration": iteration,
                       "best_dice": best_dice, "best_epoch": best_epoch, "rng": rng_states}
            if improved:
                save_checkpoint(out / "best.pt", payload)
            if (epoch + 1) % config["save_every"] == 0 or epoch + 1 == epochs:
                save_checkpoint(out / "last.pt", payload)
        progress.close()
        log.info(f"finished {epochs} epochs" + (f"; best val dice {best_dice:.2f} at epoch {best_epoch}"
                                                 if best_epoch >= 0 else ""))
        return model
    except TrainingDiverged as exc:
        log.error(str(exc))
        raise
    finally:
        if writer is not None:
            writer.close()
        _close_log(log)
        if started_processes:
            dist.destroy_process_group()


def _check_finite(first_bad: torch.Tensor, out: Path, procs: Processes) -> None:
    """Raise TrainingDiverged naming the first iteration and loss term that were not finite.

    first_bad (4,): per loss term, the first iteration at which it was not finite, -1 if none. Under
    torchrun the ranks agree first (earliest bad iteration over ranks), so that they all stop together.
    """
    if procs.world > 1:
        never = torch.iinfo(torch.long).max
        first_bad = torch.where(first_bad < 0, never, first_bad)
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        first_bad = torch.where(first_bad == never, -1, first_bad)
    bad = first_bad.tolist()
    if max(bad) < 0:
        return
    iteration = min(i for i in bad if i >= 0)
    term = LOSS_TERMS[bad.index(iteration)]
    kept = out / "last.pt"
    raise TrainingDiverged(f"loss term {term} is NaN or infinite at iteration {iteration}; training stopped. "
                           + (f"The last good checkpoint is {kept}." if kept.exists() else "No checkpoint was written."))
