"""Why do seeds of one configuration end apart? One line per run from its metrics.csv (and its test evaluations).

    python benchmarks/seed_diagnostics.py --data ph48 RUN [RUN ...] [--last] [--csv FILE]

For each SKCDF run (a folder of `skcdf train` / `skcdf ablate`) it reads the per-epoch diagnostics the trainer
writes (docs/configuration.md, metrics.csv) and prints:

- ``start``: the first epoch at which D_l's main head reaches a validation Dice of 30 (how long the labeled
  path stalls before it learns; ``-`` if never);
- ``sup@¼``: D_l's supervised main loss averaged over the first quarter of the epochs;
- ``pseudo@¼ / @½ / end``: the Dice of the pseudo-labels D_u trained on, at those points;
- ``λ@best``: the unlabeled loss's weight at the best validation epoch, and that epoch;
- ``val best / last``: the inference head's validation Dice at best.pt and at the last validation;
- ``du_dips``: how many validations put D_u's main head more than 10 points below D_l's (the unlabeled
  decoder's swings at high λ), and ``bal_u_max``: the largest kept-voxel loss of D_u's balanced head
  (``loss_unsup_bal_kept``; a cross-entropy far above 1 means that head confidently contradicts its pseudo-labels);
- the test Dice of every evaluation found in the run (``eval-<rule>``: the test-time rules of
  ``skcdf ablate --decoders``), and with ``--last`` also of last.pt (predicted into ``RUN/eval-last``):
  how much best-checkpoint selection on the few validation cases moves the result.

It trains nothing. Not a test.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path


DIP = 10.0  # Dice points by which D_u must fall below D_l on a validation to count as a dip


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _value(row: dict[str, str], key: str) -> float:
    try:
        return float(row.get(key) or "nan")
    except ValueError:
        return math.nan


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def diagnose(run: Path) -> dict[str, float | int | str]:
    """The diagnostics of one run (see the module docstring), from its metrics.csv and eval-*/summary.json."""
    rows = _rows(run)
    validated = [row for row in rows if math.isfinite(_value(row, "val_dice_mean"))]
    epochs = len(rows)
    start = next((int(row["epoch"]) for row in validated if _value(row, "val_dice_labeled_main") >= 30), -1)
    best = max(validated, key=lambda row: _value(row, "val_dice_mean")) if validated else {}

    def pseudo_at(fraction: float) -> float:
        return _value(rows[min(epochs - 1, int(fraction * epochs))], "pseudo_dice_main")

    found: dict[str, float | int | str] = {
        "run": str(run), "epochs": epochs, "start": start,
        "sup_quarter": _mean([_value(row, "loss_sup_main") for row in rows[: max(1, epochs // 4)]]),
        "pseudo_quarter": pseudo_at(0.25), "pseudo_half": pseudo_at(0.5), "pseudo_end": pseudo_at(1.0),
        "lambda_best": _value(best, "lambda"), "best_epoch": int(best.get("epoch", -1)),
        "val_best": _value(best, "val_dice_mean"), "val_last": _value(validated[-1], "val_dice_mean") if validated
        else math.nan,
        "du_dips": sum(_value(row, "val_dice_labeled_main") - _value(row, "val_dice_unlabeled_main") > DIP
                       for row in validated),
        "bal_u_max": max((_value(row, "loss_unsup_bal_kept") for row in rows), default=math.nan)}
    for summary in sorted(run.glob("eval-*/summary.json")):
        found[f"test_{summary.parent.name.removeprefix('eval-')}"] = json.loads(summary.read_text())["average"]["dice"]
    return found


def evaluate_last(run: Path, data: Path) -> None:
    """Predict and evaluate the test split with last.pt (D_u, the paper's rule) into ``run/eval-last``."""
    from skcdf.checkpoint import load_model
    from skcdf.predict import predict_and_evaluate

    if not (run / "eval-last" / "summary.json").is_file():
        model, preprocessing = load_model(run / "last.pt")
        predict_and_evaluate(model, data, run / "pred-last", run / "eval-last", preprocessing, f"{run} (last.pt)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN")
    parser.add_argument("--data", type=Path, help="the prepared data set (needed with --last)")
    parser.add_argument("--last", action="store_true", help="also evaluate last.pt on the test split")
    parser.add_argument("--csv", type=Path, help="write the table as CSV too")
    args = parser.parse_args()
    if args.last and args.data is None:
        parser.error("--last needs --data")
    if args.last:
        for run in args.runs:
            evaluate_last(run, args.data)
    table = [diagnose(run) for run in args.runs]
    columns = list(dict.fromkeys(key for row in table for key in row))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in table:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                for c in columns) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns)
            writer.writeheader()
            writer.writerows(table)


if __name__ == "__main__":
    main()
