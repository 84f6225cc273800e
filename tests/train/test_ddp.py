"""Two processes on the CPU (gloo): DistributedDataParallel keeps every rank's weights identical."""

import os
import socket

import torch
import torch.multiprocessing as mp

from skcdf.checkpoint import load_checkpoint
from tests.conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from skcdf.train.trainer import train

    # 2 labeled / 3 unlabeled cases: one of each per rank and step
    model = train(tiny_config(epochs=1, batch_labeled=1, batch_unlabeled=1), data, out)
    torch.save({name: p.detach() for name, p in model.named_parameters()}, f"{results}/rank{rank}.pt")


def test_two_processes_end_with_identical_weights(tiny_phantom, tmp_path):
    run = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_phantom), str(run), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    saved = load_checkpoint(run / "last.pt")
    assert all(torch.equal(saved["model"][name], value) for name, value in rank0.items())
    assert len(saved["rng"]) == 2  # every rank's random state, for an exact resume
    assert not (run / "last.pt.tmp").exists() and sorted(p.name for p in run.iterdir()) == \
        ["best.pt", "config.yaml", "last.pt", "metrics.csv", "tb", "train.log"]
