"""`skcdf compare`: the shapes of its arguments."""

from skcdf.cli import main


def test_three_folders_without_vs_are_refused(tmp_path, capsys):
    assert main(["compare", str(tmp_path), str(tmp_path), str(tmp_path)]) == 2
    assert "give two folders (A B), one ablation folder, or A's evaluations --vs B's" in capsys.readouterr().err


def test_a_folder_without_evaluations_is_refused(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert "no ablation evaluations" in capsys.readouterr().err
