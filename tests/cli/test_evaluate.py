"""`skcdf evaluate`, `skcdf report`, `skcdf overlay`, `skcdf curves`."""

import json
import shutil

from skcdf.cli import main


def test_evaluate_then_report(tiny_phantom, tmp_path, capsys):
    pred = tmp_path / "pred"
    pred.mkdir()
    test_cases = (tiny_phantom / "splits" / "test.txt").read_text().split()
    for case in test_cases:  # the ground truth as the prediction: Dice 100
        shutil.copy(tiny_phantom / "npy" / f"{case}_label.npy", pred / f"{case}.npy")
    out = tmp_path / "eval"
    assert main(["evaluate", str(pred), str(tiny_phantom), "--split", "test", "--out", str(out), "--workers", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["average"]["dice"] == 100.0 and (out / "per_case.csv").is_file()
    capsys.readouterr()
    assert main(["report", str(out), "--names", "perfect"]) == 0
    assert "| perfect |" in capsys.readouterr().out


def test_overlay_writes_a_png(tiny_phantom, tmp_path):
    case = (tiny_phantom / "splits" / "test.txt").read_text().split()[0]
    npy = tiny_phantom / "npy"
    png = tmp_path / "overlay.png"
    assert main(["overlay", str(npy / f"{case}_image.npy"), str(npy / f"{case}_label.npy"), "--out", str(png),
                 "--dataset", str(tiny_phantom)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_and_curves_name_what_is_missing(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none"), str(tmp_path)]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["curves", str(tmp_path), "--out", str(tmp_path / "c.png")]) == 2
    assert "error: " in capsys.readouterr().err
