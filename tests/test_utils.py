"""Atomic writes: all or nothing, with ordinary file permissions."""

from __future__ import annotations

import os

import pytest

from skcdf.utils import atomic_path, atomic_write_text


def test_atomic_write_renames_on_success_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "report.md", "hello")
    finally:
        os.umask(old)
    path = tmp_path / "a" / "report.md"
    assert path.read_text() == "hello"
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, unlike mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["report.md"]


def test_atomic_path_keeps_suffixes_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "case.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
            tmp.write_bytes(b"half written")
            raise RuntimeError("writer failed")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("new, but broken")
            raise RuntimeError
    assert target.read_text() == "old"  # the previous file survives a failed rewrite
