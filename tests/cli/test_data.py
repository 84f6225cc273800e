"""`skcdf phantom`, `skcdf prepare`, `skcdf stats`."""

from skcdf.cli import main


def test_phantom_then_stats(tmp_path, capsys):
    out = tmp_path / "phantom"
    assert main(["phantom", str(out), "--cases", "4", "--shape", "32", "48", "48", "--labeled-percent", "50",
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote 4 phantom cases to {out}" in printed and "class voxels over 4 labeled cases" in printed
    assert main(["stats", str(out), "--split", "test"]) == 0
    assert "(split test)" in capsys.readouterr().out


def test_phantom_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("mine")
    assert main(["phantom", str(tmp_path), "--cases", "4", "--workers", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_stats_and_prepare_name_a_missing_folder(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "none")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["prepare", "nifti", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "error: " in capsys.readouterr().err
