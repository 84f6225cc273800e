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

import torch

from skcdf.data.layout import read_dataset_info, read_split
from skcdf.train import trainer
from skcdf.train.config import load_config

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs


def time_epochs(data: str, patch: list[int], workers: int, epochs: int) -> list[float]:
    config = load_config("synapse_20p", [f"patch_size={patch}", f"num_workers={workers}"])
    window = read_dataset_info(data).get("window")
    procs = trainer.Processes()
    streams = [trainer._make_stream(data, read_split(data, config[f"{stream}_split"]), config, window,
                                    stream == "labeled", stream, procs, False)[0]
               for stream in ("labeled", "unlabeled")]
    iterations = len(streams[1].dataset) // config["batch_unlabeled"]
    seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        batches = [trainer._forever(loader) for loader in streams]  # fresh iterators each epoch
        for _ in range(iterations):
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
