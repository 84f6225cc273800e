"""Time one full SKCDF training iteration: knowledge transfer, both forwards, losses, backward, SGD step.

    python benchmarks/train_step.py [--quick] [--configs paper phantom] [--devices cpu cuda]
                                    [--variants fp32 bf16 bf16_cl compiled graphed] [--jsonl FILE]

For each configuration (paper: the `synapse_20p` preset, patch 64x128x128, 2+2 volumes, 32 filters;
phantom: the `phantom` preset of the CPU demo; phantom_tiny: the preset of the results tables (patch 32³, 8 filters); toy: the phantom preset at patch 32x32x32 and 4
filters, for smoke runs; all with K = 14 classes), device and variant, it reports the median
milliseconds per iteration, the peak memory and the loss of the first timed iteration, for skcdf's
step and (with ``--straightforward``) for a straightforward implementation of the same step in the
style of the reference code (EMA by parameter-name look-ups in state dicts, balanced masks by a
float64 loop over classes, one-hot Dice). Each measurement runs in a fresh process, so peak memory
(CUDA: max allocated; CPU: peak resident set) belongs to it alone. Not a test.

Variants (what the trainer's configuration keys select):
    fp32      no autocast, contiguous tensors (``amp: false``, ``channels_last: false``)
    bf16      bf16 autocast (``amp: true``; on the CPU, torch's CPU autocast, which the trainer does not use)
    bf16_cl   bf16 autocast and channels_last_3d (the CUDA default, ``auto``)
    compiled  bf16_cl with the two-flow forward under ``torch.compile`` (``compile: true``)
    graphed   compiled with ``mode="reduce-overhead"``: CUDA graphs (CUDA only; not a trainer option)
Every variant steps with the fused SGD the trainer uses.

The paper configuration needs about 20 GB of host memory on a CPU at 2+2 volumes; on a smaller
machine measure it with fewer volumes per step, e.g. ``--configs paper --batch 1 1``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs

# name -> (training preset, overrides)
CONFIGS = {"paper": ("synapse_20p", []), "phantom": ("phantom", []), "phantom_tiny": ("phantom_tiny", []),
           "toy": ("phantom", ["patch_size=[32,32,32]", "filters=4"])}
VARIANTS = ("fp32", "bf16", "bf16_cl", "compiled", "graphed")
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
            batch: tuple[int, int] | None = None, variant: str = "fp32") -> dict:
    """One measurement in this process: median ms per iteration, peak MiB and the first timed loss."""
    from skcdf.nn import SKCDFNet
    from skcdf.train.balance import class_keep_probabilities
    from skcdf.train.config import load_config
    from skcdf.train.knowledge_transfer import KnowledgeTransfer
    from skcdf.train.step import TwoFlowForward, semi_supervised_loss

    preset, overrides = CONFIGS[config_name]
    config = load_config(preset, overrides)
    patch = tuple(config.patch_size)
    device = torch.device(device_name)
    if variant == "graphed" and device.type != "cuda":
        raise SystemExit("the graphed variant needs CUDA (CUDA graphs)")
    channels_last = variant in ("bf16_cl", "compiled", "graphed")
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer: fixed shapes, fastest kernels picked once
    model = SKCDFNet(num_classes=NUM_CLASSES, filters=config.filters, patch_size=patch,
                     num_heads=config.num_heads).to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=3e-5,
                                fused=True)
    b_l, b_u = batch or (config.batch_labeled, config.batch_unlabeled)
    x_l = torch.rand(b_l, 1, *patch, device=device).contiguous(memory_format=memory_format)
    y_l = torch.randint(0, NUM_CLASSES, (b_l, *patch), device=device)
    x_u = torch.rand(b_u, 1, *patch, device=device).contiguous(memory_format=memory_format)
    counts = torch.arange(1, NUM_CLASSES + 1, dtype=torch.float64) ** 3  # an imbalanced class table
    keep_l = class_keep_probabilities(counts.numpy()).to(device)
    keep_u = 1 - 0.5 * (1 - keep_l)
    transfer = KnowledgeTransfer(model, ("Hl", "D", "Hu"), OMEGA)
    forward: torch.nn.Module = TwoFlowForward(model)
    if variant in ("compiled", "graphed"):
        forward = torch.compile(forward, mode="reduce-overhead" if variant == "graphed" else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant != "fp32")

    def iteration() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if implementation == "skcdf":
                transfer.apply()
                loss, _, _ = semi_supervised_loss(forward, x_l, y_l, x_u, unsup_weight=1.0,
                                                  keep_labeled=keep_l, keep_unlabeled=keep_u)
            else:
                _straightforward_ema(model)
                loss = _straightforward_loss(model, x_l, y_l, x_u, keep_l, keep_u, 1.0)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # warm-up: kernel selection, allocator; compilation and CUDA-graph recording need a few calls
    for _ in range(3 if device.type == "cuda" else 1):
        iteration()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        losses.append(iteration())
        synchronize()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"config": config_name, "implementation": implementation, "variant": variant, "device": device_name,
            "batch": f"{b_l}+{b_u}", "median_ms": 1000 * statistics.median(times), "repeats": repeats,
            "peak_mib": peak / 2**20, "first_loss": float(losses[0])}


def _run_child(config: str, implementation: str, device: str, variant: str, repeats: int,
               batch: tuple[int, int] | None, timeout: float | None) -> dict:
    """One measurement in a fresh process; on failure, a row whose ``error`` says why."""
    row = {"config": config, "implementation": implementation, "variant": variant, "device": device}
    command = [sys.executable, __file__, "--one", config, implementation, device, str(repeats), variant]
    try:
        child = subprocess.run(command + (["--batch", *map(str, batch)] if batch else []),
                               capture_output=True, text=True, env=os.environ, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    if child.returncode != 0:
        lines = child.stderr.strip().splitlines() or [f"exit status {child.returncode}"]
        return {**row, "error": lines[-1]}
    # inductor falls back to plain compiled code when it cannot graph a region, and only says so here
    skipped = [line.strip() for line in child.stderr.splitlines() if "skipping cudagraphs" in line]
    return {**json.loads(child.stdout), **({"note": skipped[0]} if skipped else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (paper configuration on CPU: 2)")
    parser.add_argument("--configs", nargs="+", default=["paper", "phantom"], choices=list(CONFIGS))
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=VARIANTS)
    parser.add_argument("--straightforward", action="store_true",
                        help="also time the straightforward implementation (fp32 variant only)")
    parser.add_argument("--batch", nargs=2, type=int, metavar=("B_L", "B_U"),
                        help="volumes per step instead of the presets' 2 + 2")
    parser.add_argument("--repeats", type=int, help="timed iterations per measurement (default: from --quick)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per measurement (default: none)")
    parser.add_argument("--deadline", type=float,
                        help="Unix time by which every measurement must end; later ones are skipped")
    parser.add_argument("--jsonl", help="also append one JSON object per measurement to this file")
    parser.add_argument("--one", nargs=5, metavar=("CONFIG", "IMPLEMENTATION", "DEVICE", "REPEATS", "VARIANT"),
                        help=argparse.SUPPRESS)  # a single measurement, in this (child) process
    args = parser.parse_args()
    batch = tuple(args.batch) if args.batch else None
    if args.one:
        config, implementation, device, repeats, variant = args.one
        print(json.dumps(measure(config, implementation, device, int(repeats), batch, variant)))
        return

    print(f"{cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    print("| configuration | volumes | device | implementation | variant | median ms / iteration | repeats "
          "| peak memory (MiB) | first loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [(variant, "skcdf") for variant in args.variants]
    if args.straightforward:
        runs.append(("fp32", "straightforward"))
    for config in args.configs:
        for device in args.devices:
            slow = config == "paper" and device == "cpu"
            repeats = args.repeats or ((2 if slow else 5) if args.quick else (3 if slow else 20))
            for variant, implementation in runs:
                left = (args.deadline or math.inf) - time.time()
                timeout = min(args.timeout or math.inf, left)
                row = (_run_child(config, implementation, device, variant, repeats, batch,
                                  None if timeout == math.inf else timeout) if left > 0 else
                       {"config": config, "implementation": implementation, "variant": variant, "device": device,
                        "error": "skipped: time budget spent"})
                if args.jsonl:
                    with open(args.jsonl, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                if "error" in row:
                    print(f"| {config} | | {device} | {implementation} | {variant} | failed: {row['error']} | | | |",
                          flush=True)
                    continue
                print(f"| {config} | {row['batch']} | {device} | {implementation} | {variant} | {row['median_ms']:.0f} "
                      f"| {repeats} | {row['peak_mib']:.0f} | {row['first_loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
