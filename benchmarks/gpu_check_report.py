"""Helpers of ``benchmarks/gpu_check.sh``: time a training run from its folder, and print the final table.

    python benchmarks/gpu_check_report.py train-row RUN DATA WALL_SECONDS FULL_EPOCHS   # one JSON line
    python benchmarks/gpu_check_report.py table RESULTS.jsonl                       # the markdown table

``train-row`` reads RUN/train.log, where the trainer logs one ``epoch N: ...`` line per epoch after
its validation and before its checkpoints, RUN/metrics.csv and DATA/dataset.json. Seconds per epoch are the time
between the first and the last epoch line divided by the epochs between them, so they include
validation and checkpoints but neither the start-up nor the first epoch (cuDNN's algorithm search,
compilation). The extrapolation to FULL_EPOCHS adds the measured one-off time (the rest of the wall
time) to FULL_EPOCHS epochs at that rate.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from datetime import datetime
from pathlib import Path

# "2026-11-26 20:45:01.123 epoch 3: loss ..." (milliseconds optional)
EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)?) epoch (\d+): loss")
# "... starting epoch 0: variant full, ... on cuda:0 (bfloat16 autocast, channels_last_3d)"
START_LINE = re.compile(r" (?:starting|resuming at) epoch \d+: .* on \S+ \((.*)\)$")


def epoch_times(log: Path) -> dict[int, float]:
    """{epoch: Unix time of its log line} from a run's train.log."""
    times = {}
    for line in log.read_text().splitlines():
        match = EPOCH_LINE.match(line)
        if match:
            stamp = match.group(1).replace(",", ".")
            times[int(match.group(2))] = datetime.fromisoformat(stamp).timestamp()
    return times


def train_row(run: Path, data: Path, wall_seconds: float, full_epochs: int) -> dict:
    """Seconds per epoch of a finished run, and the time of a FULL_EPOCHS run extrapolated from it."""
    times = epoch_times(run / "train.log")
    precision = [m.group(1) for m in map(START_LINE.search, (run / "train.log").read_text().splitlines()) if m]
    if len(times) < 2:
        raise SystemExit(f"{run}: train.log holds {len(times)} epoch line(s); seconds per epoch need 2 or more")
    first, last = min(times), max(times)
    per_epoch = (times[last] - times[first]) / (last - first)
    one_off = max(wall_seconds - len(times) * per_epoch, 0.0)
    with (run / "metrics.csv").open(newline="") as handle:
        dice = [float(row["val_dice_mean"]) for row in csv.DictReader(handle) if row.get("val_dice_mean")]
    size = json.loads((data / "dataset.json").read_text()).get("size")
    return {"benchmark": "train", "run": str(run), "data_size": size, "precision": precision[0] if precision else "",
            "epochs": len(times), "wall_s": wall_seconds,
            "seconds_per_epoch": per_epoch, "one_off_s": one_off, "full_epochs": full_epochs,
            "extrapolated_min": (one_off + full_epochs * per_epoch) / 60,
            "last_val_dice": dice[-1] if dice else None}


def table(results: Path) -> str:
    """One markdown table of every result line (train, data, predict, step), in the order they were measured."""
    lines = ["| measurement | size / setting | device | variant | result | peak MiB | check |",
             "|---|---|---|---|---|---|---|"]
    for text in results.read_text().splitlines():
        row = json.loads(text)
        kind = row.get("benchmark", "step")
        if "error" in row and "config" not in row:  # a whole stage failed
            lines.append(f"| {kind} | | | | failed: {row['error']} | | |")
        elif kind == "step":
            setting = f"{row['config']} {row.get('batch', '')}".strip()
            if "error" in row:
                result, peak, check = row["error"], "", ""
            else:
                result = f"{row['median_ms']:.1f} ms / iteration (median of {row['repeats']})"
                peak, check = f"{row['peak_mib']:.0f}", f"first loss {row['first_loss']:.4f}"
                if "note" in row:
                    check += f"; {row['note']}"
            lines.append(f"| train step ({row['implementation']}) | {setting} | {row['device']} | {row['variant']} "
                         f"| {result} | {peak} | {check} |")
        elif kind == "data":
            patch = "×".join(map(str, row["patch"]))
            lines.append(f"| data streams, one synapse_20p epoch | patch {patch} | host | num_workers={row['num_workers']} "
                         f"| {row['median_ms']:.0f} ms / epoch (median of {row['epochs']}) | | |")
        elif kind == "predict":
            volume = "×".join(map(str, row["volume"]))
            lines.append(f"| predict_volume | {volume}, batch {row['batch']} | {row['device']} | default (bf16 on CUDA) "
                         f"| {row['median_s']:.2f} s / volume (median of {row['repeats']}) | | "
                         f"{row['windows_per_s']:.1f} windows/s |")
        else:
            dice = "" if row["last_val_dice"] is None else f"last val Dice {row['last_val_dice']:.2f}"
            size = "×".join(map(str, row["data_size"] or ["?"]))
            lines.append(f"| skcdf train synapse_20p ({row['epochs']} epochs) | phantom {size} | | {row['precision']} "
                         f"| {row['seconds_per_epoch']:.2f} s / epoch, {row['one_off_s']:.0f} s one-off; "
                         f"{row['full_epochs']} epochs ≈ {row['extrapolated_min']:.1f} min | | {dice} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if argv[:1] == ["train-row"] and len(argv) == 5:
        print(json.dumps(train_row(Path(argv[1]), Path(argv[2]), float(argv[3]), int(argv[4]))))
    elif argv[:1] == ["table"] and len(argv) == 2:
        print(table(Path(argv[1])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
