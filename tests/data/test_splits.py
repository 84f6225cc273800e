"""Split arithmetic, seeded splits, and the `skcdf stats` table."""

from __future__ import annotations

import numpy as np
import pytest

from skcdf.cli import main
from skcdf.data.layout import dataset_info, write_case, write_dataset_info
from skcdf.data.splits import counts_from_fractions, labeled_count, labeled_split_names, make_splits
from skcdf.data.stats import fraction_table
from skcdf.utils import InputError


def test_counts_from_fractions():
    assert counts_from_fractions(360, (216, 24, 120)) == (216, 24, 120)
    assert counts_from_fractions(30, (20, 4, 6)) == (20, 4, 6)
    counts = counts_from_fractions(100, (216, 24, 120))
    assert sum(counts) == 100 and counts == (60, 7, 33)
    assert counts_from_fractions(4, (20, 4, 6)) == (2, 1, 1)  # every split keeps a case
    assert counts_from_fractions(10, (1, 0, 1)) == (5, 0, 5)
    with pytest.raises(InputError, match="three non-negative numbers"):
        counts_from_fractions(10, (1, -1, 1))


def test_labeled_count_floors_like_the_reference():
    assert labeled_count(20, 20) == 4 and labeled_count(216, 5) == 10 and labeled_count(16, 10) == 1
    assert labeled_count(3, 10) == 1
    assert labeled_split_names(20) == ("labeled_20p", "unlabeled_20p")
    assert labeled_split_names(2.5) == ("labeled_2.5p", "unlabeled_2.5p")
    with pytest.raises(InputError, match="labeled percent"):
        labeled_count(20, 0)


def test_make_splits_is_seeded_disjoint_and_complete():
    ids = [f"{i:04d}" for i in range(30)]
    splits = make_splits(ids, ["extra"], (20, 4, 6), 20, seed=0)
    assert make_splits(ids, ["extra"], (20, 4, 6), 20, seed=0) == splits
    assert make_splits(ids, ["extra"], (20, 4, 6), 20, seed=1) != splits
    assert sorted(splits["train"] + splits["eval"] + splits["test"]) == ids
    assert len(set(splits["train"]) | set(splits["eval"]) | set(splits["test"])) == 30
    assert set(splits["labeled_20p"]) | set(splits["unlabeled_20p"]) == set(splits["train"]) | {"extra"}
    assert len(splits["labeled_20p"]) == 4 and not set(splits["labeled_20p"]) & set(splits["unlabeled_20p"])


def test_stats_cli_prints_class_fractions(tmp_path, capsys):
    label = np.zeros((4, 5, 5), np.uint8)  # 100 voxels: 70 background, 20 of class 1, 10 of class 2
    label.reshape(-1)[:20] = 1
    label.reshape(-1)[20:30] = 2
    write_case(tmp_path, "a", np.zeros(label.shape, np.float32), label, None)
    write_case(tmp_path, "b", np.zeros(label.shape, np.float32), None, None)  # unlabeled: not counted
    write_dataset_info(tmp_path, dataset_info("t", ["background", "liver", "right adrenal gland"], None, None))
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "over 1 labeled cases" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])}
    assert rows["Li"][-3:] == ["20", "20.000", "66.67"] and rows["RAG"][-3:] == ["10", "10.000", "33.33"]
    assert "Li / RAG = 2x" in out


def test_fraction_table_names_absent_classes():
    table = fraction_table(np.array([90, 10, 0]), ["background", "a", "b"], ["BG", "A", "B"])
    assert "classes with no voxel: B" in table
