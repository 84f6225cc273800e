"""`skcdf predict`: a prepared data set's split, and the device options."""

import pytest

from skcdf.cli import main


def test_predict_a_split_of_a_prepared_data_set(run_folder, tiny_phantom, tmp_path, capsys):
    run, _ = run_folder
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(tiny_phantom), str(out), "--split", "test", "--device", "cpu"]) == 0
    test_cases = (tiny_phantom / "splits" / "test.txt").read_text().split()
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{case}.nii.gz" for case in test_cases)
    assert f"wrote {len(test_cases)} file(s) to {out}" in capsys.readouterr().out


@pytest.mark.parametrize("device, message", [("tpu", "not a torch device"), ("cuda:7", "CUDA is not available")])
def test_a_device_this_machine_lacks_is_refused(device, message, run_folder, tmp_path, capsys):
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run, _ = run_folder
    assert main(["predict", str(run), str(tmp_path), str(tmp_path / "pred"), "--device", device]) == 2
    assert message in capsys.readouterr().err


def test_predict_names_a_missing_input(run_folder, tmp_path, capsys):
    run, _ = run_folder
    assert main(["predict", str(run), str(tmp_path / "none.nii.gz"), str(tmp_path / "pred"), "--device", "cpu"]) in (1, 2)
    assert "none.nii.gz" in capsys.readouterr().err
