"""`skcdf demo` and `skcdf ablate`: arguments, and the registry's default rows."""

import skcdf.ablate as ablate
import skcdf.demo as demo
from skcdf.cli import build_parser, main
from skcdf.methods import ablation_names


def test_ablate_defaults_to_the_registry_rows(tmp_path, monkeypatch):
    args = build_parser().parse_args(["ablate", "phantom", "--data", "d", "--out", "o"])
    assert args.variants == ablation_names() and args.seeds == [0, 1, 666] and args.jobs == 1
    planned = []
    monkeypatch.setattr(ablate, "run_ablation", lambda *a, **k: planned.append(a) or tmp_path / "ablation.md")
    (tmp_path / "ablation.md").write_text("table\n")
    assert main(["ablate", "phantom", "--data", "d", "--out", "o", "--variants", "df", "--seeds", "3"]) == 0
    (preset, data, out, rows, seeds, overrides) = planned[0][:6]
    assert [row.run_name for row in rows] == ["df"] and seeds == [3]
    assert main(["ablate", "phantom", "--data", "d", "--out", "o", "--variants", "cps", "df", "--controls"]) == 0
    assert [row.run_name for row in planned[1][3]] == ["cps", "cps_method_weight-0", "df", "df_lambda_u-0"]


def test_ablate_refuses_no_jobs(capsys):
    assert main(["ablate", "phantom", "--data", "d", "--out", "o", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_demo_passes_its_options(monkeypatch):
    seen = []
    monkeypatch.setattr(demo, "main_cli", lambda *args: seen.append(args) or 0)
    assert main(["demo", "--out", "d", "--minutes", "2", "--seed", "5", "--device", "cpu"]) == 0
    assert seen == [("d", 2.0, 5, "cpu")]
