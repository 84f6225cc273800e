"""Aggregation of evaluation summaries over seeds, and the `skcdf report` table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from skcdf.cli import main
from skcdf.report import SUMMARY_FORMAT, aggregate, find_summaries, load_summary, render_table
from skcdf.utils import InputError

ABBREVS = ["Sp", "RK", "LK"]


def synthetic_summary(rng: np.random.Generator) -> dict:
    dice = rng.uniform(40, 90, 3)
    asd = rng.uniform(0.5, 20, 3)
    return {
        "format": SUMMARY_FORMAT,
        "classes": [1, 2, 3],
        "class_names": ["spleen", "right kidney", "left kidney"],
        "class_abbrevs": ABBREVS,
        "per_class": {"dice": dice.tolist(), "asd": asd.tolist(), "asd_mm": [None] * 3},
        "average": {"dice": float(dice.mean()), "asd": float(asd.mean()), "asd_mm": None},
    }


def write_run(folder, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.mark.parametrize("ddof", [0, 1])
def test_aggregate_is_mean_and_std_over_seeds(ddof):
    rng = np.random.default_rng(0)
    summaries = [synthetic_summary(rng) for _ in range(3)]
    result = aggregate(summaries, ddof=ddof)
    dice = np.array([s["per_class"]["dice"] for s in summaries])
    averages = np.array([s["average"]["dice"] for s in summaries])
    np.testing.assert_allclose(result["per_class"]["dice"]["mean"], dice.mean(0))
    np.testing.assert_allclose(result["per_class"]["dice"]["std"], dice.std(0, ddof=ddof))
    assert result["average"]["dice"]["mean"] == pytest.approx(averages.mean())
    assert result["average"]["dice"]["std"] == pytest.approx(averages.std(ddof=ddof))
    assert np.isnan(result["average"]["asd_mm"]["mean"])  # null in JSON counts as NaN
    assert result["runs"] == 3 and result["class_abbrevs"] == ABBREVS


def test_aggregate_refuses_different_classes():
    rng = np.random.default_rng(1)
    first, second = synthetic_summary(rng), synthetic_summary(rng)
    second["classes"] = [1, 2, 4]
    with pytest.raises(InputError, match="cannot be aggregated"):
        aggregate([first, second])


def test_render_table_layout():
    rng = np.random.default_rng(2)
    summaries = [synthetic_summary(rng) for _ in range(2)]
    many, one = aggregate(summaries), aggregate(summaries[:1])
    lines = render_table([("SKCDF", many), ("single", one)]).splitlines()
    assert lines[0] == "| Method | Sp | RK | LK | Dice (%) | ASD (voxel) |"
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    dice_avg = np.array([s["average"]["dice"] for s in summaries])
    assert cells[1] == f"{np.mean([s['per_class']['dice'][0] for s in summaries]):.2f}"
    assert cells[4] == f"{dice_avg.mean():.2f} ± {dice_avg.std():.2f}"
    assert [c.strip() for c in lines[3].split("|")[1:-1]][4] == f"{dice_avg[0]:.2f}"  # one seed: no ± std


def test_find_summaries_search_order(tmp_path):
    rng = np.random.default_rng(3)
    write_run(tmp_path / "a" / "eval", synthetic_summary(rng))
    write_run(tmp_path / "a" / "other", synthetic_summary(rng))
    write_run(tmp_path / "a", {"format": "something else"})  # not an evaluation summary: passed over
    assert find_summaries(tmp_path / "a") == [tmp_path / "a" / "eval" / "summary.json"]
    write_run(tmp_path / "b" / "seed0" / "x", synthetic_summary(rng))
    write_run(tmp_path / "b" / "seed1", synthetic_summary(rng))
    assert len(find_summaries(tmp_path / "b")) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no evaluation summary"):
        find_summaries(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InputError, match="bad.json"):
        load_summary(tmp_path / "bad.json")


def test_report_command(tmp_path, capsys):
    rng = np.random.default_rng(4)
    seeds = [synthetic_summary(rng) for _ in range(3)]
    for seed, summary in zip((0, 1, 666), seeds):
        write_run(tmp_path / f"skcdf_s{seed}" / "eval", summary)
    runs = [str(tmp_path / f"skcdf_s{seed}") for seed in (0, 1, 666)]
    out = tmp_path / "table.md"
    assert main(["report", *runs, "--names", "SKCDF", "--out", str(out)]) == 0
    dice = np.array([s["average"]["dice"] for s in seeds])
    row = out.read_text().splitlines()[2]
    assert row.startswith("| SKCDF |") and f"{dice.mean():.2f} ± {dice.std():.2f}" in row
    assert out.read_text() == capsys.readouterr().out

    assert main(["report", *runs, "--names", "a", "b", "c"]) == 0  # one row per run
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + 3 + 2
    assert main(["report", *runs, "--names", "a", "b"]) == 2
    assert "--names" in capsys.readouterr().err
