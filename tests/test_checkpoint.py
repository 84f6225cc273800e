"""The background checkpoint writer: snapshots at save time, atomic files, errors surface in the caller."""

import threading

import pytest
import torch

from skcdf.checkpoint import CheckpointWriter, cpu_copy, load_checkpoint


def test_cpu_copy_is_a_snapshot():
    weights = torch.zeros(3)
    payload = {"model": {"w": weights}, "rng": [torch.ones(2), 5], "epoch": 1}
    snapshot = cpu_copy(payload)
    weights += 1  # training goes on updating in place
    assert torch.equal(snapshot["model"]["w"], torch.zeros(3))
    assert snapshot["rng"][1] == 5 and snapshot["epoch"] == 1 and isinstance(snapshot["rng"], list)


def test_writer_saves_what_the_payload_held_when_save_was_called(tmp_path, monkeypatch):
    release = threading.Event()
    real_save = torch.save

    def slow_save(obj, path):  # the disk is slow: the training thread goes on meanwhile
        release.wait(timeout=10)
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", slow_save)
    weights = torch.zeros(4)
    with CheckpointWriter() as writer:
        writer.save({"model": {"w": weights}, "epoch": 1}, [tmp_path / "last.pt", tmp_path / "best.pt"])
        weights += 7  # the next training step, while the write is in flight
        assert not (tmp_path / "last.pt").exists()  # nothing half-written under the final name
        release.set()
    for name in ("last.pt", "best.pt"):
        saved = load_checkpoint(tmp_path / name)
        assert saved["epoch"] == 1 and torch.equal(saved["model"]["w"], torch.zeros(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary files left


def test_a_failed_write_is_raised_by_the_next_save_or_wait(tmp_path):
    writer = CheckpointWriter()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    writer.save({"epoch": 1}, [blocker / "last.pt"])
    with pytest.raises(OSError):
        writer.wait()
    writer.wait()  # reported once
    writer.save({"epoch": 2}, [tmp_path / "last.pt"])
    writer.wait()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_the_exception_of_the_block_wins_over_a_write_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(KeyboardInterrupt) as caught, CheckpointWriter() as writer:
        writer.save({"epoch": 1}, [blocker / "last.pt"])
        raise KeyboardInterrupt
    assert "writing a checkpoint failed too" in caught.value.__notes__[0]
