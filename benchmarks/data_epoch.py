"""Time the data side of one training epoch: the trainer's two streams, without the network.

    python benchmarks/data_epoch.py DATA [--patch D H W] [--workers 0 2] [--epochs 5] [--jsonl FILE]

DATA is a prepared data set with the `synapse_20p` splits (e.g. `skcdf phantom DATA`). Each epoch
draws the batches of `synapse_20p`'s 8 iterations (len(unlabeled_20p) / 2) from fresh iterators, as
the trainer does: 4 labeled cases at 2 per step make 4 passes of the labeled stream, 16 unlabeled
cases one pass. Reports the median milliseconds per epoch for each ``num_workers``. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from skcdf.data.layout import read_dataset_info
from skcdf.train.config import load_config
from skcdf.train.processes import Processes
from skcdf.train.streams import open_streams, select_cases

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs


def time_epochs(data: str, patch: list[int], workers: int, epochs: int) -> list[float]:
    config = load_config("synapse_20p", [f"patch_size={patch}", f"num_workers={workers}"])
    procs = Processes()
    streams = open_streams(config, Path(data), read_dataset_info(data), select_cases(config, Path(data), procs), procs)
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        batches = streams.batches()  # fresh iterators each epoch, as the trainer draws them
        for _ in range(streams.iterations_per_epoch):
            for stream in batches:
                next(stream)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="prepared data set with the synapse_20p splits")
    parser.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128], metavar=("D", "H", "W"))
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--jsonl", help="also append one JSON object per num_workers to this file")
    args = parser.parse_args()
    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; patch {args.patch}")
    for workers in args.workers:
        seconds = time_epochs(args.data, args.patch, workers, args.epochs)
        median_ms = 1000 * statistics.median(seconds)
        print(f"num_workers={workers}: median {median_ms:.0f} ms per epoch of batches "
              f"({', '.join(f'{1000 * s:.0f}' for s in seconds)})")
        if args.jsonl:
            row = {"benchmark": "data", "num_workers": workers, "patch": args.patch, "median_ms": median_ms,
                   "epochs": args.epochs}
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
