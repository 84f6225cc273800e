"""Time sliding-window prediction of one volume (SPEC §4) with a randomly initialised SKCDFNet.

Default: the paper's setting, one 80×160×160 volume, 32 filters, patch 64×128×128, 14 classes, stride
16×32×32 (8 windows). ``--quick`` shrinks everything (8 filters, patch 32×64×64, volume 40×80×80) for
a smoke run. Reports the median wall time over ``--repeats`` runs and windows per second, on the CPU
and on CUDA when present, and with ``--device onnx`` for the model exported to ONNX and run by
onnxruntime (needs ``skcdf[onnx]``).

``--scan-size D H W`` instead predicts one full-size scan (int16 HU, e.g. 600 512 512) the way
``skcdf predict`` does a scan file: resampled to the training size, the sliding window, and the
probabilities resampled back class by class. It reports the time and the process's peak resident
memory (run one size per process: the peak is the process's). ``--spacing X Y Z`` predicts it as a
model of the spacing-based path (issue 27) does: resampled to that spacing over the whole scan (its
own ``--scan-spacing``, default 0.8 0.8 1.5), the data set z-score, the sliding window over all of it.

    .venv/bin/python benchmarks/predict.py [--quick] [--repeats N] [--batch N] [--tta] [--device cpu|cuda]
                                           [--jsonl FILE]
    .venv/bin/python benchmarks/predict.py --scan-size 600 512 512 [--batch N] [--device cpu]
    .venv/bin/python benchmarks/predict.py --quick --scan-size 600 512 512 --scan-spacing 0.8 0.8 1 \
        --spacing 1.5 1.5 1.5 [--fp16-output]
    .venv/bin/python benchmarks/predict.py --device cpu --device onnx      # PyTorch against onnxruntime
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from skcdf.data.geometry import Geometry
from skcdf.data.spacing import network_size
from skcdf.export import OnnxModel, export_onnx
from skcdf.infer import InferenceSettings, predict_scan, predict_volume
from skcdf.nn import SKCDFNet

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs

PAPER = {"filters": 32, "patch": (64, 128, 128), "volume": (80, 160, 160)}
QUICK = {"filters": 8, "patch": (32, 64, 64), "volume": (40, 80, 80)}
NUM_CLASSES = 14


def window_count(volume: tuple[int, ...], patch: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """Windows per volume: per axis ceil((n - p) / s) + 1, the last one flush with the end."""
    return math.prod(math.ceil(max(n - p, 0) / s) + 1 for n, p, s in zip(volume, patch, stride))


def time_device(device: str, setup: dict, settings: InferenceSettings, repeats: int) -> list[float]:
    """Seconds per volume of each timed run; device ``"onnx"`` runs the exported model with onnxruntime."""
    torch.manual_seed(0)  # the same weights on every device
    model = SKCDFNet(num_classes=NUM_CLASSES, filters=setup["filters"], patch_size=setup["patch"]).eval()
    image = np.random.default_rng(0).uniform(-1000, 1000, setup["volume"]).astype(np.float32)
    preprocessing = {"size": list(setup["volume"]), "window": [-75, 275], "patch_size": list(setup["patch"])}
    if device == "onnx":
        with tempfile.TemporaryDirectory() as folder:
            # as many threads as PyTorch gets, for a fair comparison
            model = OnnxModel.load(export_onnx(model, preprocessing, Path(folder) / "model.onnx"), torch.get_num_threads())
    else:
        model = model.to(device)
    if device == "cuda":
        predict_volume(model, image, preprocessing, settings)  # warm-up: CUDA context, cuDNN algorithm choice
    seconds = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict_volume(model, image, preprocessing, settings)  # returns a numpy array, so CUDA work is done
        seconds.append(time.perf_counter() - start)
    return seconds


def peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_full_scan(device: str, setup: dict, settings: InferenceSettings, scan_size: tuple[int, int, int],
                   scan_spacing: tuple[float, float, float], spacing: tuple[float, float, float] | None) -> None:
    """Predict one random int16 scan of ``scan_size`` (D, H, W) on its own grid; print time and peak memory.

    ``spacing``: as a model of the spacing-based path with this (x, y, z) spacing, else of the fixed size."""
    model = SKCDFNet(num_classes=NUM_CLASSES, filters=setup["filters"], patch_size=setup["patch"]).to(device).eval()
    preprocessing = {"size": list(setup["volume"]), "window": [-75, 275], "patch_size": list(setup["patch"])}
    if spacing is not None:
        preprocessing.update(size=None, spacing=list(spacing), normalization="dataset", intensity={
            "mean": 60.0, "std": 120.0, "percentile_00_5": -950.0, "percentile_99_5": 900.0})
    scan = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, scan_size, dtype=np.int16))
    scan.SetSpacing(scan_spacing)
    grid = network_size(Geometry.of_image(scan), preprocessing)
    before = peak_rss_gib()
    start = time.perf_counter()
    labels = predict_scan(model, scan, preprocessing, settings).labels
    seconds = time.perf_counter() - start
    assert labels.shape == scan_size
    name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"{device} ({name}): scan {scan_size} int16 at {scan_spacing} mm -> {grid} -> back, "
          f"{setup['filters']} filters, patch {setup['patch']}, stride {settings.stride}, fp16 output "
          f"{settings.fp16_output}: {seconds:.1f} s; peak RSS "
          f"{peak_rss_gib():.2f} GiB (before predicting, with the model and the scan: {before:.2f} GiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and volume (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 2 on CPU, 5 on CUDA)")
    parser.add_argument("--batch", type=int, default=InferenceSettings().sw_batch_size, help="windows per forward")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation (4 passes per window)")
    parser.add_argument("--device", choices=("cpu", "cuda", "onnx"), action="append",
                        help="default: cpu, and cuda if present; onnx: the exported model in onnxruntime (CPU)")
    parser.add_argument("--scan-size", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="predict one full-size scan of this size (one device) and report peak memory")
    parser.add_argument("--scan-spacing", type=float, nargs=3, default=(0.8, 0.8, 1.5), metavar=("X", "Y", "Z"),
                        help="--scan-size: the scan's spacing in mm (default 0.8 0.8 1.5)")
    parser.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                        help="--scan-size: predict as a spacing-based model of this spacing (mm), not a fixed size")
    parser.add_argument("--fp16-output", action="store_true",
                        help="accumulate the sliding window's probabilities in float16 (skcdf predict --fp16-output)")
    parser.add_argument("--stride", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="window step (default 16 32 32)")
    parser.add_argument("--jsonl", help="also append one JSON object per device to this file")
    args = parser.parse_args()

    setup = QUICK if args.quick else PAPER
    settings = InferenceSettings(sw_batch_size=args.batch, tta=args.tta, fp16_output=args.fp16_output,
                                 stride=tuple(args.stride) if args.stride else InferenceSettings().stride)
    devices = args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.scan_size:
        time_full_scan(devices[0], setup, settings, tuple(args.scan_size), tuple(args.scan_spacing),
                       None if args.spacing is None else tuple(args.spacing))
        return
    windows = window_count(setup["volume"], setup["patch"], settings.stride) * (4 if args.tta else 1)
    print(
        f"volume {setup['volume']}, patch {setup['patch']}, {setup['filters']} filters, {NUM_CLASSES} classes, "
        f"stride {settings.stride}, batch {args.batch}, tta {args.tta}: {windows} window passes per volume"
    )
    for device in devices:
        repeats = args.repeats or (5 if device == "cuda" else 2)
        seconds = time_device(device, setup, settings, repeats)
        name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
        median = statistics.median(seconds)
        print(
            f"{device} ({name}): median {median:.2f} s per volume over "
            f"{repeats} runs ({', '.join(f'{s:.2f}' for s in seconds)}), {windows / median:.2f} windows/s"
        )
        if args.jsonl:
            row = {"benchmark": "predict", "device": device, "volume": list(setup["volume"]), "batch": args.batch,
                   "tta": args.tta, "median_s": median, "repeats": repeats, "windows_per_s": windows / median}
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
