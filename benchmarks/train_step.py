"""Time one full SKCDF training iteration: knowledge transfer, both forwards, losses, backward, SGD step.

    python benchmarks/train_step.py [--quick] [--configs paper phantom] [--devices cpu cuda]

For each configuration (paper: the `synapse_20p` preset, patch 64x128x128, 2+2 volumes, 32 filters;
phantom: the `phantom` preset of the CPU demo; both with K = 14 classes) and device, it reports the median milliseconds per
iteration and the peak memory, for skcdf's step and for a straightforward implementation of the same
step in the style of the reference code (EMA by parameter-name look-ups in state dicts, balanced
masks by a float64 loop over classes, one-hot Dice). Each measurement runs in a fresh process, so
peak memory (CUDA: max allocated; CPU: peak resident set) belongs to it alone. Not a test.

The paper configuration needs about 20 GB of host memory on a CPU at 2+2 volumes; on a smaller
machine measure it with fewer volumes per step, e.g. ``--configs paper --batch 1 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs

CONFIGS = {"paper": "synapse_20p", "phantom": "phantom"}  # name -> training preset
NUM_CLASSES = 14
OMEGA = 0.99


# ----------------------------------------------------------------------------- straightforward step

def _straightforward_ema(model: torch.nn.Module) -> None:
    """Knowledge transfer as the reference writes it: per parameter, a state-dict look-up by name."""
    pairs = [(model.labeled_decoder.main_head, model.labeled_decoder.aux_head),
             (model.unlabeled_decoder, model.labeled_decoder),
             (model.unlabeled_decoder.main_head, model.unlabeled_decoder.aux_head)]
    for dst, src in pairs:
        for name, param in dst.named_parameters():
            if name in src.state_dict().keys():
                source = src.state_dict()[name]
                if param.shape == source.shape:
                    param.data = OMEGA * param.data + (1 - OMEGA) * source.data


def _straightforward_mask(keep: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bernoulli mask by replacing each class index with its probability, class after class, in float64."""
    probability = labels.to(torch.float64)
    for c in range(len(keep)):
        probability = torch.where(probability == c, keep[c].double(), probability)
    return torch.bernoulli(probability)


def _straightforward_dice_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE + 1 − mean foreground batch Dice from a one-hot label tensor."""
    probs = logits.softmax(1)
    onehot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probs.dtype)
    tp = (probs * onehot).sum((0, 2, 3, 4))
    fp = (probs * (1 - onehot)).sum((0, 2, 3, 4))
    fn = ((1 - probs) * onehot).sum((0, 2, 3, 4))
    dice = (2 * tp + 1) / (2 * tp + fp + fn + 1)
    return F.cross_entropy(logits, labels) + 1 - dice[1:].mean()


def _straightforward_loss(model, x_l, y_l, x_u, keep_l, keep_u, weight):
    b_l = x_l.shape[0]
    pl, pl_aux = model(torch.cat([x_l, x_u]), flow="labeled", n_labeled=b_l)
    mask_l = _straightforward_mask(keep_l, y_l)
    sup = _straightforward_dice_ce(pl[:b_l], y_l) + _straightforward_dice_ce(
        pl_aux[:b_l] * mask_l.unsqueeze(1), (y_l * mask_l).long())  # the float64 mask promotes, as in the reference
    pseudo, pseudo_aux = pl[b_l:].argmax(1).detach(), pl_aux[b_l:].argmax(1).detach()
    mask_u = _straightforward_mask(keep_u, pseudo_aux)
    pu, pu_aux = model(x_u, flow="unlabeled")
    unsup = _straightforward_dice_ce(pu, pseudo) + _straightforward_dice_ce(
        pu_aux * mask_u.unsqueeze(1), (pseudo_aux * mask_u).long())
    return sup + weight * unsup


# ----------------------------------------------------------------------------- one measurement

def measure(config_name: str, implementation: str, device_name: str, repeats: int,
            batch: tuple[int, int] | None = None) -> dict:
    from skcdf.nn import SKCDFNet
    from skcdf.train.balance import class_keep_probabilities
    from skcdf.train.config import load_config
    from skcdf.train.knowledge_transfer import KnowledgeTransfer
    from skcdf.train.step import TwoFlowForward, semi_supervised_loss

    config = load_config(CONFIGS[config_name])
    patch = tuple(config["patch_size"])
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = SKCDFNet(num_classes=NUM_CLASSES, filters=config["filters"], patch_size=patch,
                     num_heads=config["num_heads"]).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=3e-5)
    b_l, b_u = batch or (config["batch_labeled"], config["batch_unlabeled"])
    x_l = torch.rand(b_l, 1, *patch, device=device)
    y_l = torch.randint(0, NUM_CLASSES, (b_l, *patch), device=device)
    x_u = torch.rand(b_u, 1, *patch, device=device)
    counts = torch.arange(1, NUM_CLASSES + 1, dtype=torch.float64) ** 3  # an imbalanced class table
    keep_l = class_keep_probabilities(counts.numpy()).to(device)
    keep_u = 1 - 0.5 * (1 - keep_l)
    transfer = KnowledgeTransfer(model, ("Hl", "D", "Hu"), OMEGA)
    forward = TwoFlowForward(model)

    def iteration() -> None:
        optimizer.zero_grad(set_to_none=True)
        if implementation == "skcdf":
            transfer.apply()
            loss, _, _ = semi_supervised_loss(forward, x_l, y_l, x_u, unsup_weight=1.0,
                                           keep_labeled=keep_l, keep_unlabeled=keep_u)
        else:
            _straightforward_ema(model)
            loss = _straightforward_loss(model, x_l, y_l, x_u, keep_l, keep_u, 1.0)
        loss.backward()
        optimizer.step()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    iteration()  # warm-up: kernel selection, allocator
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        iteration()
        synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"config": config_name, "implementation": implementation, "device": device_name, "batch": f"{b_l}+{b_u}",
            "median_ms": 1000 * statistics.median(times), "repeats": repeats, "peak_mib": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (paper configuration on CPU: 2)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--batch", nargs=2, type=int, metavar=("B_L", "B_U"),
                        help="volumes per step instead of the presets' 2 + 2")
    parser.add_argument("--one", nargs=4, metavar=("CONFIG", "IMPLEMENTATION", "DEVICE", "REPEATS"),
                        help=argparse.SUPPRESS)  # a single measurement, in this (child) process
    args = parser.parse_args()
    batch = tuple(args.batch) if args.batch else None
    if args.one:
        config, implementation, device, repeats = args.one
        print(json.dumps(measure(config, implementation, device, int(repeats), batch)))
        return

    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| configuration | volumes | device | implementation | median ms / iteration | repeats | peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        for device in args.devices:
            slow = config == "paper" and device == "cpu"
            repeats = (2 if slow else 5) if args.quick else (3 if slow else 20)
            for implementation in ("skcdf", "straightforward"):
                command = [sys.executable, __file__, "--one", config, implementation, device, str(repeats)]
                child = subprocess.run(command + (["--batch", *map(str, batch)] if batch else []),
                                       capture_output=True, text=True, env=os.environ)
                if child.returncode != 0:
                    print(f"| {config} | | {device} | {implementation} | failed: {child.stderr.strip().splitlines()[-1]} | | |")
                    continue
                row = json.loads(child.stdout)
                print(f"| {config} | {row['batch']} | {device} | {implementation} | {row['median_ms']:.0f} | {repeats} "
                      f"| {row['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
