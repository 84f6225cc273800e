"""How strongly the reference masking mode scales down the balanced heads' gradient (docs/results.md §6).

    python benchmarks/balanced_gradient.py DATA [--split labeled_20p] [--patch 32 32 32] [--batches 50]

On training patches of a prepared data set (2 per batch, the split's labeled cases, the trainer's random
crops and flips), the balanced mask is drawn as the trainer draws it, and near-uniform logits (an
untrained head) are scored by the balanced DiceCE in the ``reference`` mode and over the kept voxels
alone (``exclude``). It reports the kept fraction of the voxels, the ratio of the two losses' gradient
norms on the kept voxels' logits, and both loss values beside ln K + 1. Medians over the batches.
Not a timing and not a test.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from skcdf.data.layout import read_dataset_info, read_split
from skcdf.data.loaders import PatchDataset, class_voxel_counts
from skcdf.train.balance import class_keep_probabilities, sample_balance_mask
from skcdf.train.losses import balanced_dice_ce


def measure(data: str, split: str, patch: tuple[int, int, int], batches: int) -> dict[str, list[float]]:
    """Per batch: kept fraction, gradient-norm ratio exclude / reference, and both loss values."""
    info = read_dataset_info(data)
    cases = read_split(data, split)
    keep = class_keep_probabilities(class_voxel_counts(data, cases, info["num_classes"]))
    patches = PatchDataset(data, cases, patch, with_labels=True, window=info["window"])
    torch.manual_seed(0)
    results: dict[str, list[float]] = {"kept": [], "ratio": [], "reference": [], "kept_loss": []}
    for batch in range(batches):
        labels = torch.stack([patches[(i % len(cases), 1000 * batch + i)]["label"] for i in range(2)])
        mask = sample_balance_mask(keep, labels)
        logits = (0.1 * torch.randn(2, info["num_classes"], *patch)).requires_grad_(True)
        norms = []
        for mode, key in (("reference", "reference"), ("exclude", "kept_loss")):
            loss = balanced_dice_ce(logits, labels, mask, mode)
            (gradient,) = torch.autograd.grad(loss, logits)
            norms.append(gradient.permute(1, 0, 2, 3, 4)[:, mask].norm().item())
            results[key].append(loss.item())
        results["kept"].append(mask.float().mean().item())
        results["ratio"].append(norms[1] / norms[0])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="prepared data set (e.g. `skcdf phantom ph48 --shape 32 48 48`)")
    parser.add_argument("--split", default="labeled_20p")
    parser.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    results = measure(args.data, args.split, tuple(args.patch), args.batches)
    num_classes = read_dataset_info(args.data)["num_classes"]
    kept, ratio = np.array(results["kept"]), np.array(results["ratio"])
    print(f"kept voxels: median {np.median(kept):.3%} (range {kept.min():.3%} to {kept.max():.3%})")
    print(f"gradient norm on the kept voxels' logits, exclude / reference: median {np.median(ratio):.0f}x "
          f"(range {ratio.min():.0f} to {ratio.max():.0f}), {args.batches} batches of 2 patches")
    print(f"loss at near-uniform logits: reference {np.median(results['reference']):.3f}, kept voxels "
          f"{np.median(results['kept_loss']):.3f}; ln K + 1 = {math.log(num_classes) + 1:.3f}")


if __name__ == "__main__":
    main()
