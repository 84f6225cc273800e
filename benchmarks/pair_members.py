"""Each network of a Table 1 method alone: how much of a pair's Dice is the average of its two networks.

    python benchmarks/pair_members.py --data ph48 RUN [RUN ...]

A CPS-pair method (and DST) predicts with the mean of its networks' logits (DHC's ``test.py --cps AB``).
For each trained run this predicts the test split with each predicting network alone, exactly as
``skcdf ablate`` predicts with the pair (sliding window, the run's preprocessing), evaluates it with
skcdf's evaluation into ``RUN/eval-<network>/``, and prints each network's and the pair's class-averaged
Dice. ``skcdf compare`` then pairs them over cases and seeds (docs/results.md §7). Finished evaluations
are reused. Not a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from skcdf.checkpoint import load_model
from skcdf.methods.plugin import MethodNet
from skcdf.predict import predict_and_evaluate
from skcdf.utils import InputError


def evaluate_members(run: Path, data: Path, split: str = "test") -> dict[str, float]:
    """Predict and evaluate ``split`` with each predicting network of ``run`` alone, into
    ``run/pred-<network>`` and ``run/eval-<network>``; returns {network: class-averaged Dice (%)}."""
    model, preprocessing = load_model(run)
    if not isinstance(model, MethodNet) or len(model.recipe.inference) < 2:
        raise InputError(f"{run}: not a run of a Table 1 method that averages several networks")
    pair = model.recipe
    dice = {}
    for name in pair.inference:
        evaluation = run / f"eval-{name}"
        if not (evaluation / "summary.json").is_file():
            model.recipe = dataclasses.replace(pair, inference=(name,))
            predict_and_evaluate(model, data, run / f"pred-{name}", evaluation, preprocessing, f"{run} network {name}",
                                 split=split)
        dice[name] = json.loads((evaluation / "summary.json").read_text())["average"]["dice"]
    return dice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of a pair method (best.pt)")
    parser.add_argument("--data", required=True, type=Path, help="the prepared data set the runs trained on")
    parser.add_argument("--split", default="test", help="the split predicted and evaluated (default test)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for run in args.runs:
        members = evaluate_members(run, args.data, args.split)
        pair = run / "eval-unlabeled" / "summary.json"
        together = f"{json.loads(pair.read_text())['average']['dice']:.2f}" if pair.is_file() else "not evaluated"
        print(f"{run}: " + ", ".join(f"{name} alone {d:.2f}" for name, d in members.items()) + f"; together {together}")


if __name__ == "__main__":
    main()
