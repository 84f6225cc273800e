"""nnU-Net v2 as an external row of skcdf's comparison table (``results/phantom_ssl.csv``).

nnU-Net (``nnunetv2`` from PyPI, an optional dependency of benchmarks/ only: requirements-nnunet.txt) is
trained through its own Python API on the labeled cases that skcdf's methods train on, for the same
number of iterations, predicts the test split through its API, and is scored by skcdf's own
evaluation (:func:`skcdf.evaluation.evaluate_folders`). Two rows:

- ``nnunet``: nnU-Net as it comes (``nnUNetTrainer``: mirroring along every axis in training and as
  test-time augmentation);
- ``nnunet_nomirror``: its ``nnUNetTrainerNoMirroring`` (no mirroring in training or at inference, as
  TotalSegmentator trains for its left/right structures).

What it does, in order (each step is reused when an earlier invocation finished it):

1. Converts the prepared skcdf data set to an nnU-Net raw data set ``OUT/nnUNet_raw/Dataset<ID>_<name>``:
   the labeled split's cases (``--labeled-split``, default ``labeled_20p``) to ``imagesTr``/``labelsTr``
   and the test split's images to ``imagesTs``, NIfTI written by SimpleITK with the ``_0000`` channel
   suffix, on the prepared grid of each case's geometry json (1 mm isotropic where the data set has none);
   ``dataset.json`` with skcdf's class names as labels and the channel ``CT``.
2. Fingerprint, plan (nnU-Net's default ``ExperimentPlanner``: plans ``nnUNetPlans``) and preprocessing
   of ``3d_fullres`` (``OUT/nnUNet_preprocessed``), one process.
3. Trains ``3d_fullres``, fold ``all`` (every labeled case is a training case; nnU-Net's per-epoch
   validation then runs on those same cases, and is only a progress signal: the final checkpoint is the
   one predicted with, never ``checkpoint_best``), with a trainer subclass whose
   ``num_iterations_per_epoch`` × ``num_epochs`` is ``--iterations`` (default 2,400 = 48 × 50).
   ``num_val_iterations_per_epoch`` keeps nnU-Net's ratio (50 per 250) to the training iterations.
4. Predicts the test split with nnU-Net's predictor (sliding window, Gaussian weighting, tile step 0.5,
   mirroring TTA along the axes the trainer allows: all three for ``nnunet``, none for
   ``nnunet_nomirror``), back in each case's prepared grid.
5. Evaluates with skcdf (per_case.csv, summary.json, table.md) and appends one CSV row per trainer in the
   table's format, ``variant,seed,iterations,split,mean_dice,<class abbreviations>`` (Dice in %),
   replacing a row of the same variant, seed, iterations and split.

Usage (a separate virtual environment, so that skcdf's own stays free of nnunetv2)::

    python3.11 -m venv /work/venv-nnunet
    /work/venv-nnunet/bin/pip install torch==2.13.0 -r benchmarks/requirements-nnunet.txt
    /work/venv-nnunet/bin/pip install -e .
    /work/venv-nnunet/bin/python benchmarks/nnunet_row.py --data ph48 --out nnunet_ph48 \\
        --iterations 2400 --epochs 50 --seed 0 --trainer both --device cpu --threads 1 \\
        --csv results/phantom_ssl.csv

Outputs under ``--out``: ``nnUNet_raw/``, ``nnUNet_preprocessed/``, ``nnUNet_results/seed<S>/`` (nnU-Net's
own folders; the three environment variables point there), and per row ``runs/<variant>/seed<S>/``
with ``pred/`` (NIfTI), ``eval/`` (skcdf's evaluation) and ``run.json`` (the plan nnU-Net chose, the
parameter count, seconds per iteration, the row). The CSV defaults to ``OUT/nnunet.csv``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import re
import sys
import time
from pathlib import Path

# Numerical libraries are imported only after _set_environment: the nnUNet_* folders are read when
# nnunetv2 is imported, and the thread counts when numpy and torch load their OpenMP/BLAS runtimes.

TRAINERS = {  # --trainer value: (row name in the CSV, nnU-Net trainer class it subclasses)
    "default": ("nnunet", "nnUNetTrainer"),
    "nomirror": ("nnunet_nomirror", "nnUNetTrainerNoMirroring"),
}
CONFIGURATION = "3d_fullres"
FOLD = "all"
PLANS = "nnUNetPlans"
# nnU-Net's defaults: 250 training and 50 validation iterations per epoch.
NNUNET_TRAIN_PER_EPOCH, NNUNET_VAL_PER_EPOCH = 250, 50


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a prepared skcdf data set (skcdf phantom / prepare)")
    parser.add_argument("--out", required=True, type=Path, help="working folder (nnU-Net's folders, predictions, evaluations)")
    parser.add_argument("--iterations", type=int, default=2400, help="training iterations (default 2400, as the table)")
    parser.add_argument("--epochs", type=int, default=50,
                        help="nnU-Net epochs; iterations per epoch = iterations / epochs (default 50: 48 per epoch)")
    parser.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch before training (default 0)")
    parser.add_argument("--trainer", choices=("default", "nomirror", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch, OpenMP and SimpleITK (default 1)")
    parser.add_argument("--da-workers", type=int, default=0,
                        help="nnU-Net's data-augmentation worker processes (nnUNet_n_proc_DA; 0: in the main process)")
    parser.add_argument("--val-iterations", type=int, default=None,
                        help="nnU-Net's validation iterations per epoch (default: its ratio, 1 per 5 training iterations)")
    parser.add_argument("--labeled-split", default="labeled_20p", help="the cases nnU-Net trains on (default labeled_20p)")
    parser.add_argument("--split", default="test", help="the split predicted and evaluated (default test)")
    parser.add_argument("--dataset-id", type=int, default=501, help="nnU-Net data set id under --out (default 501)")
    parser.add_argument("--csv", type=Path, default=None, help="CSV the rows are appended to (default OUT/nnunet.csv)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.epochs < 1 or args.iterations % args.epochs:
        parser.error(f"--iterations {args.iterations} must be a positive multiple of --epochs {args.epochs}")
    if args.threads < 1 or args.da_workers < 0 or not 1 <= args.dataset_id <= 999:
        parser.error("--threads must be >= 1, --da-workers >= 0 and --dataset-id 1..999")
    if args.val_iterations is not None and args.val_iterations < 1:
        parser.error("--val-iterations must be >= 1")
    return args


def _set_environment(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    os.environ["nnUNet_raw"] = str(out / "nnUNet_raw")
    os.environ["nnUNet_preprocessed"] = str(out / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(out / "nnUNet_results" / f"seed{args.seed}")
    os.environ["nnUNet_n_proc_DA"] = str(args.da_workers)
    os.environ["nnUNet_def_n_proc"] = str(args.threads)  # nnU-Net's threads for resampling and export (default 8)
    os.environ["nnUNet_compile"] = "f"  # nnU-Net turns it off on the CPU anyway; on CUDA it would add minutes
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(args.threads)


def log(message: str) -> None:
    print(f"[nnunet_row {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- 1. conversion


def dataset_name(dataset_id: int, info: dict) -> str:
    """nnU-Net's folder name, ``Dataset<ID>_<name>`` (the name reduced to letters, digits, - and _)."""
    return f"Dataset{dataset_id:03d}_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", info["name"]).strip("_") or "skcdf")


def _nifti(array, geometry):
    """A SimpleITK image of a prepared (D, H, W) volume on its prepared grid (1 mm, identity without geometry)."""
    import SimpleITK as sitk

    from skcdf.data.geometry import prepared_grid

    image = sitk.GetImageFromArray(array)
    if geometry is not None:
        grid = prepared_grid(geometry, array.shape)
        image.SetSpacing(grid.spacing)
        image.SetOrigin(grid.origin)
        image.SetDirection(grid.direction)
    return image


def convert(data: Path, raw_root: Path, dataset_id: int, labeled_split: str, split: str) -> Path:
    """The nnU-Net raw data set of ``data`` (made once, in a staging folder renamed into place)."""
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    from skcdf.data.layout import load_geometry, load_image, load_label, read_dataset_info, read_split, staged_output_dir
    from skcdf.utils import InputError

    info = read_dataset_info(data)
    labeled, test = read_split(data, labeled_split), read_split(data, split)
    source = {"data": str(data.resolve()), "labeled_split": labeled_split, "labeled": labeled,
              "split": split, "test": test, "class_names": info["class_names"]}
    folder = raw_root / dataset_name(dataset_id, info)
    stamp = folder / "skcdf_source.json"
    if stamp.is_file():
        if json.loads(stamp.read_text()) != source:
            raise InputError(f"{folder}: converted from another data set or split ({stamp}); use another --out or --dataset-id")
        log(f"raw data set {folder.name}: already converted ({len(labeled)} training, {len(test)} test cases)")
        return folder
    others = sorted(p.name for p in raw_root.glob(f"Dataset{dataset_id:03d}_*")) if raw_root.is_dir() else []
    if others:
        raise InputError(f"{raw_root}: id {dataset_id} is taken by {', '.join(others)}; use another --dataset-id")
    log(f"converting {len(labeled)} labeled ({labeled_split}) and {len(test)} {split} cases of {data} to {folder}")
    with staged_output_dir(folder) as staging:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (staging / sub).mkdir()
        for case in labeled:
            geometry = load_geometry(data, case)
            sitk.WriteImage(_nifti(load_image(data, case), geometry), str(staging / "imagesTr" / f"{case}_0000.nii.gz"), True)
            label = np.asarray(load_label(data, case), dtype=np.uint8)
            sitk.WriteImage(_nifti(label, geometry), str(staging / "labelsTr" / f"{case}.nii.gz"), True)
        for case in test:
            sitk.WriteImage(_nifti(load_image(data, case), load_geometry(data, case)),
                            str(staging / "imagesTs" / f"{case}_0000.nii.gz"), True)
        generate_dataset_json(str(staging), channel_names={0: "CT"},
                              labels={name: index for index, name in enumerate(info["class_names"])},
                              num_training_cases=len(labeled), file_ending=".nii.gz", dataset_name=folder.name,
                              description=f"skcdf data set {data} ({labeled_split}), converted by benchmarks/nnunet_row.py",
                              license="as the source data set", converted_by="benchmarks/nnunet_row.py")
        (staging / "skcdf_source.json").write_text(json.dumps(source, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- 2. planning


def plan_and_preprocess(dataset_id: int, preprocessed: Path) -> dict:
    """nnU-Net's fingerprint, default plans and 3d_fullres preprocessing (once); returns the plans."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                     preprocess)
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    folder = preprocessed / convert_id_to_dataset_name(dataset_id)
    done = folder / "skcdf_preprocessed.json"
    if not done.is_file():
        start = time.perf_counter()
        log("nnU-Net: fingerprint, plans, 3d_fullres preprocessing (1 process)")
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=True, clean=True)
        # The planner sizes networks with torch.set_num_threads(<data-augmentation workers>), which refuses 0:
        # the thread count stands in for the workers while it plans (it restores torch's count after).
        da_workers = os.environ["nnUNet_n_proc_DA"]
        os.environ["nnUNet_n_proc_DA"] = os.environ["nnUNet_def_n_proc"]
        try:
            plan_experiments([dataset_id])
        finally:
            os.environ["nnUNet_n_proc_DA"] = da_workers
        preprocess([dataset_id], plans_identifier=PLANS, configurations=(CONFIGURATION,), num_processes=(1,))
        done.write_text(json.dumps({"seconds": round(time.perf_counter() - start, 1)}) + "\n")
    else:
        log(f"nnU-Net: {folder.name} already planned and preprocessed")
    return json.loads((folder / f"{PLANS}.json").read_text())


def plan_summary(plans: dict) -> dict:
    """What nnU-Net chose for 3d_fullres: patch, batch, spacing, network stages and widths."""
    config = plans["configurations"][CONFIGURATION]
    arch = config.get("architecture", {})
    kwargs = arch.get("arch_kwargs", {})
    return {"patch_size": config["patch_size"], "batch_size": config["batch_size"], "spacing": config["spacing"],
            "median_image_size_in_voxels": config.get("median_image_size_in_voxels"),
            "normalization": config.get("normalization_schemes"), "network": arch.get("network_class_name"),
            "n_stages": kwargs.get("n_stages"), "features_per_stage": kwargs.get("features_per_stage"),
            "strides": kwargs.get("strides"), "n_conv_per_stage": kwargs.get("n_conv_per_stage"),
            "n_conv_per_stage_decoder": kwargs.get("n_conv_per_stage_decoder")}


# ---------------------------------------------------------------------------------------------- 3. training


def trainer_class(base_name: str, iterations_per_epoch: int, epochs: int, val_iterations: int):
    """A subclass of nnU-Net's ``base_name`` trainer that trains ``iterations_per_epoch`` × ``epochs``
    iterations, checkpoints ten times a run, and times its epochs (``self.timing``)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring import \
        nnUNetTrainerNoMirroring

    base = {"nnUNetTrainer": nnUNetTrainer, "nnUNetTrainerNoMirroring": nnUNetTrainerNoMirroring}[base_name]

    class Trainer(base):
        # The same parameter names as nnUNetTrainer.__init__: it records them by name (my_init_kwargs).
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = iterations_per_epoch
            self.num_epochs = epochs
            self.num_val_iterations_per_epoch = val_iterations
            self.save_every = max(1, epochs // 10)  # checkpoint_latest for resuming a long CPU run
            self.timing: list[dict] = []

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._iteration, self._train_start, self._train_cpu = 0, time.perf_counter(), time.process_time()

        def train_step(self, batch: dict) -> dict:
            result = super().train_step(batch)
            self._iteration += 1
            if self._iteration % max(1, self.num_iterations_per_epoch // 4) == 0:
                seconds = time.perf_counter() - self._train_start
                self.print_to_log_file(f"iteration {self._iteration}/{self.num_iterations_per_epoch} of epoch "
                                       f"{self.current_epoch}: {seconds / self._iteration:.2f} s/iteration, "
                                       f"loss {float(result['loss']):.4f}")
            return result

        def on_train_epoch_end(self, train_outputs):
            self._train_seconds = time.perf_counter() - self._train_start  # data augmentation included
            self._train_cpu_seconds = time.process_time() - self._train_cpu  # this process's CPU time, all threads
            super().on_train_epoch_end(train_outputs)

        def on_validation_epoch_start(self):
            super().on_validation_epoch_start()
            self._val_start, self._val_cpu = time.perf_counter(), time.process_time()

        def on_epoch_end(self):
            self.timing.append({"epoch": self.current_epoch, "train_s": round(self._train_seconds, 3),
                                "train_cpu_s": round(self._train_cpu_seconds, 3),
                                "train_iterations": self.num_iterations_per_epoch,
                                "val_s": round(time.perf_counter() - self._val_start, 3),
                                "val_cpu_s": round(time.process_time() - self._val_cpu, 3),
                                "val_iterations": self.num_val_iterations_per_epoch})
            super().on_epoch_end()

    Trainer.__name__ = Trainer.__qualname__ = f"{base_name}_{iterations_per_epoch}x{epochs}"
    return Trainer


def train(trainer_cls, plans: dict, dataset_json: dict, device, seed: int) -> tuple[Path, dict]:
    """Train fold ``all`` to the end (resuming from checkpoint_latest; reusing a finished run).

    Returns the final checkpoint and {"parameters", "timing" (this invocation's epochs)}."""
    import numpy as np
    import torch

    results_folder = Path(os.environ["nnUNet_results"]) / plans["dataset_name"]
    output = results_folder / f"{trainer_cls.__name__}__{PLANS}__{CONFIGURATION}" / f"fold_{FOLD}"
    final, latest = output / "checkpoint_final.pth", output / "checkpoint_latest.pth"
    if final.is_file():
        log(f"{trainer_cls.__name__}: finished run found ({final})")
        return final, {}
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    trainer = trainer_cls(plans=dict(plans, continue_training=latest.is_file()), configuration=CONFIGURATION,
                          fold=FOLD, dataset_json=dataset_json, device=device)
    if latest.is_file():
        log(f"{trainer_cls.__name__}: resuming from {latest}")
        trainer.load_checkpoint(str(latest))
    else:
        trainer.initialize()
    parameters = sum(p.numel() for p in trainer.network.parameters())
    log(f"{trainer_cls.__name__}: {trainer.num_epochs} epochs × {trainer.num_iterations_per_epoch} iterations, "
        f"batch {trainer.batch_size}, {parameters:,} parameters, on {device}")
    trainer.run_training()
    if not final.is_file():
        raise RuntimeError(f"{output}: nnU-Net finished without writing checkpoint_final.pth")
    return final, {"parameters": parameters, "timing": trainer.timing}


# ---------------------------------------------------------------------------------------------- 4. prediction


def predict(checkpoint_path: Path, images: dict[str, Path], out: Path, device) -> dict:
    """Predict every image with nnU-Net's predictor into ``out/<case>.nii.gz`` (staged, then renamed).

    The network is built by nnUNetTrainer.build_network_architecture (the subclasses do not change it)
    and handed to the predictor with the checkpoint's weights and mirroring axes, because the predictor's
    own loader looks trainers up by name in nnunetv2's package only. Returns the mirroring axes used."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from skcdf.data.layout import staged_output_dir

    model_folder = checkpoint_path.parent.parent
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    plans_manager = PlansManager(json.loads((model_folder / "plans.json").read_text()))
    dataset_json = json.loads((model_folder / "dataset.json").read_text())
    configuration = plans_manager.get_configuration(checkpoint["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans_manager, configuration, determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    network.load_state_dict(checkpoint["network_weights"])
    mirror_axes = checkpoint.get("inference_allowed_mirroring_axes")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=device.type == "cuda", device=device, allow_tqdm=True)
    predictor.manual_initialization(network, plans_manager, configuration, [checkpoint["network_weights"]],
                                    dataset_json, checkpoint["trainer_name"], mirror_axes)
    with staged_output_dir(out, overwrite=True) as staging:
        predictor.predict_from_files_sequential([[str(images[case])] for case in images],
                                                [str(staging / case) for case in images],
                                                save_probabilities=False, overwrite=True)
    return {"mirror_axes": None if mirror_axes is None else list(mirror_axes)}


# ---------------------------------------------------------------------------------------------- 5. the table


def table_row(variant: str, seed: int, iterations: int, summary: dict) -> list[str]:
    """One line of results/phantom_ssl.csv's format (as ``skcdf ablate --csv`` writes it)."""
    return [variant, str(seed), str(iterations), summary["split"], f"{summary['average']['dice']:.4f}",
            *(f"{dice:.4f}" for dice in summary["per_class"]["dice"])]


def append_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Add ``rows`` to the CSV at ``path`` (created with ``header``), replacing rows of the same
    variant, seed, iterations and split; the file is rewritten atomically."""
    from skcdf.utils import InputError, atomic_write_text

    kept: list[list[str]] = []
    if path.is_file():
        existing = list(csv.reader(io.StringIO(path.read_text())))
        if existing and existing[0] != header:
            raise InputError(f"{path}: its header {existing[0]} is not {header}")
        keys = {tuple(row[:4]) for row in rows}
        kept = [row for row in existing[1:] if row and tuple(row[:4]) not in keys]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(kept + rows)
    atomic_write_text(path, buffer.getvalue())


def seconds_per_iteration(timing: list[dict]) -> dict | None:
    """Seconds per training iteration (data augmentation included) and per validation iteration, wall
    clock and this process's CPU time. On a machine shared with other work the wall clock grows with the
    load; with one thread the CPU time is what an idle core would take."""
    if not timing:
        return None

    def per(key: str, count: str) -> float:
        return round(sum(e[key] for e in timing) / sum(e[count] for e in timing), 3)

    return {"train_s_per_iteration": per("train_s", "train_iterations"),
            "train_cpu_s_per_iteration": per("train_cpu_s", "train_iterations"),
            "val_s_per_iteration": per("val_s", "val_iterations"),
            "val_cpu_s_per_iteration": per("val_cpu_s", "val_iterations"),
            "epoch_s": [round(e["train_s"] + e["val_s"], 1) for e in timing]}


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> list[list[str]]:
    import SimpleITK as sitk
    import torch

    from skcdf.data.layout import read_dataset_info
    from skcdf.evaluation import evaluate_folders
    from skcdf.utils import atomic_write_text

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:  # already set once parallel work started
        pass
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    device = torch.device(args.device)
    out = args.out.resolve()
    csv_path = args.csv or out / "nnunet.csv"
    per_epoch = args.iterations // args.epochs
    val_iterations = args.val_iterations or max(1, round(per_epoch * NNUNET_VAL_PER_EPOCH / NNUNET_TRAIN_PER_EPOCH))

    info = read_dataset_info(args.data)
    raw = convert(args.data, out / "nnUNet_raw", args.dataset_id, args.labeled_split, args.split)
    plans = plan_and_preprocess(args.dataset_id, out / "nnUNet_preprocessed")
    plan = plan_summary(plans)
    log(f"plan {CONFIGURATION}: patch {plan['patch_size']}, batch {plan['batch_size']}, spacing "
        f"{[round(s, 3) for s in plan['spacing']]}, {plan['n_stages']} stages {plan['features_per_stage']}")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    test_cases = json.loads((raw / "skcdf_source.json").read_text())["test"]
    images = {case: raw / "imagesTs" / f"{case}_0000.nii.gz" for case in test_cases}

    rows = []
    header = ["variant", "seed", "iterations", "split", "mean_dice", *info["class_abbrevs"][1:]]
    for key in ("default", "nomirror") if args.trainer == "both" else (args.trainer,):
        variant, base = TRAINERS[key]
        folder = out / "runs" / variant / f"seed{args.seed}"
        record_path = folder / "run.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        trainer_cls = trainer_class(base, per_epoch, args.epochs, val_iterations)
        started = time.perf_counter()
        checkpoint, trained = train(trainer_cls, plans, dataset_json, device, args.seed)
        epochs_done = torch.load(checkpoint, map_location="cpu", weights_only=False)["current_epoch"]  # as trained
        if trained:
            record.update(trained, train_wall_s=round(time.perf_counter() - started, 1),
                          speed=seconds_per_iteration(trained["timing"]))
            atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        log(f"{variant}: predicting {len(images)} {args.split} case(s)")
        started = time.perf_counter()
        record.update(predict(checkpoint, images, folder / "pred", device),
                      predict_wall_s=round(time.perf_counter() - started, 1))
        summary = evaluate_folders(folder / "pred", args.data, folder / "eval", split=args.split,
                                   name=f"nnU-Net ({base}, {epochs_done * per_epoch} iterations)", workers=1)
        row = table_row(variant, args.seed, epochs_done * per_epoch, summary)
        record.update(variant=variant, trainer=trainer_cls.__name__, base_trainer=base, configuration=CONFIGURATION,
                      fold=FOLD, plans=PLANS, plan=plan, checkpoint=str(checkpoint), iterations=epochs_done * per_epoch,
                      iterations_per_epoch=per_epoch, epochs=epochs_done, val_iterations_per_epoch=val_iterations,
                      device=args.device, threads=args.threads, seed=args.seed, row=dict(zip(header, row)))
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        append_rows(csv_path, header, [row])
        log(f"{variant}: mean Dice {float(row[4]):.2f} % over {summary['num_cases']} case(s); row added to {csv_path}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _set_environment(args)
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        print("nnunetv2 is not installed in this environment: see benchmarks/requirements-nnunet.txt", file=sys.stderr)
        return 2
    from skcdf.utils import InputError

    try:
        for row in run(args):
            print(",".join(row))
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
