"""The run folder's bookkeeping: its configuration check, the random state, metrics.csv, TensorBoard and train.log.

A run folder holds config.yaml, last.pt, best.pt, metrics.csv, train.log and tb/ (TensorBoard). This
module decides whether a folder may be trained into (a new run, or a resume of the same
configuration), captures and restores every random state of a process (checkpointed at epoch
boundaries, so a resume is bit-exact), and reads and writes the metric rows and the log.
"""

from __future__ import annotations

import csv
import io
import logging
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from skcdf.train.config import DEFAULTS, RUNTIME_KEYS, Config
from skcdf.train.monitor import HEADS
from skcdf.train.step import TERMS
from skcdf.utils import InputError, atomic_write_text


def check_run_folder(out: Path, config: Config, resume: bool) -> bool:
    """Refuse to overwrite another run; returns True when there is a last.pt to resume from."""
    config_file = out / "config.yaml"
    if not config_file.exists():
        if out.exists() and any(out.iterdir()):
            raise InputError(f"{out}: the folder is not empty and holds no skcdf run (no config.yaml); choose another --out")
        return False
    previous = yaml.safe_load(config_file.read_text()) or {}
    # a key added since that run was written has its default there (the behaviour before the key existed)
    current = config.to_dict()
    changed = [f"{key}: {previous.get(key, DEFAULTS[key])!r} -> {current[key]!r}" for key in DEFAULTS
               if key not in RUNTIME_KEYS and previous.get(key, DEFAULTS[key]) != current[key]]
    if changed:
        raise InputError(f"{out}: holds a run with a different configuration ({'; '.join(changed)}); "
                         "choose another --out")
    if not resume:
        raise InputError(f"{out}: already holds a run of this configuration; pass --resume to continue it "
                         "or choose another --out")
    return (out / "last.pt").exists()


def rng_state(device: torch.device, generators: dict[str, torch.Generator]) -> dict[str, Any]:
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


def restore_rng_state(state: dict[str, Any], device: torch.device, generators: dict[str, torch.Generator]) -> None:
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


def read_metric_rows(path: Path, before_epoch: int) -> list[dict[str, str]]:
    """Rows of an interrupted run's metrics.csv for the epochs already checkpointed."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if int(row["epoch"]) < before_epoch]


def write_metric_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def write_scalars(writer: SummaryWriter, row: dict[str, Any], iteration: int) -> None:
    """An epoch's metrics row to TensorBoard at ``iteration``, grouped as loss/, val_dice/ and pseudo/."""
    for key, value in row.items():
        if key not in ("epoch", "iteration"):
            tag = key.replace("val_dice_", "val_dice/").replace("loss_", "loss/").replace("pseudo_", "pseudo/")
            writer.add_scalar(tag, value, iteration)
    writer.flush()


def epoch_message(row: dict[str, Any], best_dice: float, best_epoch: int) -> str:
    """train.log's line for an epoch: losses, schedule, and the pseudo-labels' and validation Dice where measured."""
    message = (f"epoch {row['epoch']}: loss {row['loss']:.4f} (sup {row['loss_sup']:.4f}, "
               f"unsup {row['loss_unsup']:.4f}), lr {row['lr']:.4g}, lambda {row['lambda']:.4g}")
    if "pseudo_dice_main" in row:
        message += f", pseudo-label dice {row['pseudo_dice_main']:.2f}"
    if "val_dice_mean" in row:
        message += f", val dice {row['val_dice_mean']:.2f} (best {best_dice:.2f} at epoch {best_epoch})"
    return message


def open_log(path: Path, enabled: bool) -> logging.Logger:
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


def close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def metric_columns(class_abbrevs: list[str], terms: Sequence[str] = TERMS) -> list[str]:
    """metrics.csv columns: schedule, losses (``terms``: the step's), validation Dice (inference head per
    class, every head), pseudo-label quality. A term named ``sup`` shares ``loss_sup`` (the same number)."""
    schedule = ["epoch", "iteration", "lr", "lambda", "loss", "loss_sup", "loss_unsup"]
    return (schedule + [f"loss_{term}" for term in terms if f"loss_{term}" not in schedule]
            + ["val_dice_mean"] + [f"val_dice_{abbrev}" for abbrev in class_abbrevs]
            + [f"val_dice_{head}" for head in HEADS] + [f"val_dice_small_{head}" for head in HEADS]
            + ["pseudo_dice_main", "pseudo_dice_aux", "pseudo_fg_main", "pseudo_fg_aux", "true_fg"])
