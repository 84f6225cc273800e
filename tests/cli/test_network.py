"""`skcdf import-reference` and `skcdf export`."""

import pytest
import torch

from skcdf.cli import main


def test_import_reference_refuses_a_state_dict_it_does_not_know(tmp_path, capsys):
    bogus = tmp_path / "best_model.pth"
    torch.save({"not.a.reference.key": torch.zeros(1)}, bogus)
    assert main(["import-reference", str(bogus), str(tmp_path / "out.pt")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {bogus}")
    assert not (tmp_path / "out.pt").exists()


def test_export_writes_an_onnx_model(run_folder, tmp_path, capsys):
    pytest.importorskip("onnx")
    run, _ = run_folder
    assert main(["export", str(run), str(tmp_path / "model.onnx")]) == 0
    assert (tmp_path / "model.onnx").is_file() and "unlabeled decoder" in capsys.readouterr().out


def test_export_names_a_missing_run(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none"), str(tmp_path / "model.onnx")]) == 2
    assert "error: " in capsys.readouterr().err
