"""Where this process stands among the processes torchrun started (one process without torchrun).

Under ``torchrun`` each process trains on its shard of the data with DistributedDataParallel; only
rank 0 validates and writes the run folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """Where this process stands among the torchrun processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_processes() -> tuple[Processes, bool]:
    """Join the process group torchrun describes in the environment; (processes, whether we started it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Processes(), False
    procs = Processes(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return procs, False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return procs, True


def gather(obj: Any, procs: Processes) -> list[Any]:
    """``obj`` of every rank, in rank order (a one-element list without torchrun)."""
    if procs.world == 1:
        return [obj]
    gathered: list[Any] = [None] * procs.world
    dist.all_gather_object(gathered, obj)
    return gathered
