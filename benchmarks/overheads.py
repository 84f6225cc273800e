"""Time what surrounds the training step at the paper's model size: the SGD update and a checkpoint.

    python benchmarks/overheads.py [--device cpu|cuda] [--repeats N] [--folder DIR]

- SGD update (momentum 0.9, Nesterov, weight decay; the ~51 M parameters of the paper's model,
  200 tensors): the per-parameter loop (torch's default on the CPU), ``foreach=True`` (the
  default on CUDA) and ``fused=True`` (what the trainer uses), median ms per ``optimizer.step()``.
- Checkpoint (model + optimiser state, ~0.4 GB, as the trainer writes it): ``save_checkpoint`` on
  the training thread, against ``CheckpointWriter.save``, where the training thread waits only for
  the copy to the CPU and the file is written in the background; median seconds the training thread
  is blocked, and the background write's own duration. ``--folder`` sets where the files go
  (default: a temporary folder; the disk decides the synchronous figure).
Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from skcdf.checkpoint import CheckpointWriter, save_checkpoint
from skcdf.nn import SKCDFNet

from _machine import cpu_name  # benchmarks/ is on sys.path when a script here runs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_optimizers(model: torch.nn.Module, device: torch.device, repeats: int) -> dict[str, float]:
    """Median ms of one SGD step per implementation, on random gradients."""
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    medians = {}
    for name, choice in {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=3e-5,
                                    **choice)
        optimizer.step()  # creates the momentum buffers
        times = []
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            optimizer.step()
            _synchronize(device)
            times.append(time.perf_counter() - start)
        medians[name] = 1000 * statistics.median(times)
    return medians


def time_checkpoints(payload: dict, folder: Path, repeats: int) -> dict[str, float]:
    """Median seconds the training thread is blocked by a synchronous and by a background write."""
    blocked_sync, blocked_async, background = [], [], []
    with CheckpointWriter() as writer:
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(folder / "sync.pt", payload)
            blocked_sync.append(time.perf_counter() - start)

            start = time.perf_counter()
            writer.save(payload, [folder / "async.pt"])
            blocked_async.append(time.perf_counter() - start)
            writer.wait()  # the next save would wait here too; measured apart from the blocked time
            background.append(time.perf_counter() - start)
    return {"sync_s": statistics.median(blocked_sync), "async_blocked_s": statistics.median(blocked_async),
            "async_total_s": statistics.median(background)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=Path, help="where the checkpoints are written (default: a temporary folder)")
    args = parser.parse_args()
    device = torch.device(args.device)
    model = SKCDFNet(num_classes=14, filters=32, patch_size=(64, 128, 128)).to(device)
    count = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{name}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"paper model: {count / 1e6:.1f} M parameters in {len(list(model.parameters()))} tensors")

    for implementation, ms in time_optimizers(model, device, args.repeats).items():
        print(f"SGD step, {implementation}: {ms:.1f} ms (median of {args.repeats})")

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, fused=True)
    optimizer.step()
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1}
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        result = time_checkpoints(payload, Path(folder), args.repeats)
        size = (Path(folder) / "sync.pt").stat().st_size
    print(f"checkpoint of {size / 2**30:.2f} GiB: training blocked {result['sync_s']:.2f} s (synchronous) vs "
          f"{result['async_blocked_s']:.2f} s (CheckpointWriter; the background write took "
          f"{result['async_total_s']:.2f} s), medians of {args.repeats}")


if __name__ == "__main__":
    main()
