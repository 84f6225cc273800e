"""Two processes on the CPU (gloo): DistributedDataParallel keeps every rank's weights identical, and a
labeled split too small to shard is drawn whole by every rank, each in its own order."""

import json
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


def _worker(rank: int, world: int, port: int, data: str, out: str, results: str, batch_labeled: int,
            variant: str, settings: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from skcdf.train import trainer
    from skcdf.train.streams import ShardedRandomSampler

    passes = []  # per sampler pass: (cases in the stream, the case indices this rank drew)
    real_draw = ShardedRandomSampler.draw

    def recording_draw(sampler):
        drawn = real_draw(sampler)  # (case index, augmentation seed) pairs
        passes.append((sampler.size, [index for index, _ in drawn]))
        return drawn

    ShardedRandomSampler.draw = recording_draw
    # 2 labeled / 3 unlabeled cases; one unlabeled volume per rank and step
    config = tiny_config(variant=variant, epochs=1, batch_labeled=batch_labeled, batch_unlabeled=1, **settings)
    model = trainer.train(config, data, out)
    torch.save({name: p.detach() for name, p in model.named_parameters()}, f"{results}/rank{rank}.pt")
    with open(f"{results}/rank{rank}.json", "w") as handle:
        json.dump(passes, handle)


def _train_on_two_processes(data, tmp_path, batch_labeled: int, variant: str = "full", **settings):
    """Run the tiny training on 2 gloo processes; returns (run folder, rank 0's weights, each rank's passes)."""
    run = tmp_path / "run"
    mp.spawn(_worker, args=(2, _free_port(), str(data), str(run), str(tmp_path), batch_labeled, variant, settings),
             nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, value in rank0.items():
        assert torch.equal(value, rank1[name]), name
    saved = load_checkpoint(run / "last.pt")
    assert all(torch.equal(saved["model"][name], value) for name, value in rank0.items())
    assert len(saved["rng"]) == 2  # every rank's random state, for an exact resume
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.csv", "tb",
                                                     "train.log"]
    passes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    return run, saved, passes


def test_two_processes_end_with_identical_weights(tiny_phantom, tmp_path):
    # one labeled volume per rank and step: the 2 labeled cases are sharded, one per rank; with the options
    # of scans of any size (class-aware patches, whole-case validation), which every rank applies alike
    run, _, passes = _train_on_two_processes(tiny_phantom, tmp_path, batch_labeled=1, patch_sampling="class",
                                             val_region="whole")
    for size in (2, 3):
        first = [next(indices for n, indices in ranks_passes if n == size) for ranks_passes in passes]
        assert all(len(indices) == 1 for indices in first) and first[0] != first[1]  # disjoint shards
    assert "too few to shard" not in (run / "train.log").read_text()


def test_too_few_labeled_cases_to_shard_every_rank_draws_from_all(tiny_phantom, tmp_path):
    # 2 labeled cases, 2 per step, 2 processes: formerly "needs at least 4 cases"
    run, saved, passes = _train_on_two_processes(tiny_phantom, tmp_path, batch_labeled=2)
    for ranks_passes in passes:
        labeled = [indices for size, indices in ranks_passes if size == 2]
        assert labeled and all(sorted(indices) == [0, 1] for indices in labeled)  # every pass: all labeled cases
        assert all(len(indices) == 1 for size, indices in ranks_passes if size == 3)  # unlabeled still sharded
    orders = [state["generators"]["labeled_order"] for state in saved["rng"]]
    assert not torch.equal(orders[0], orders[1])  # each rank its own stream, checkpointed for the resume
    assert "2 labeled cases are too few to shard across 2 processes" in (run / "train.log").read_text()


def test_a_table1_method_keeps_both_networks_identical_across_processes(tiny_phantom, tmp_path):
    # CPS steps two networks with two optimisers of its own, without DDP: each optimiser averages the
    # gradients over the processes before it steps (skcdf.methods.plugin)
    _, saved, _ = _train_on_two_processes(tiny_phantom, tmp_path, batch_labeled=1, variant="cps")
    assert {key.split(".")[1] for key in saved["model"]} == {"A", "B"} and "method_state" in saved
