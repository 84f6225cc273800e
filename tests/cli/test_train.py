"""`skcdf train`: configuration errors before any work, method names from the registry."""

import pytest

from skcdf.cli import main
from skcdf.methods import METHODS


@pytest.mark.parametrize("settings, message", [
    (["filterz=2"], "error: --set: unknown configuration key 'filterz' (did you mean 'filters'?)"),
    (["variant=mystery"], f"variant must be one of {', '.join(METHODS)}, got 'mystery'"),
    (["epochs"], "expected key=value"),
])
def test_bad_settings_are_one_error_line(settings, message, tmp_path, capsys):
    assert main(["train", "phantom", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                 "--set", *settings]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unknown_preset_lists_the_presets(tmp_path, capsys):
    assert main(["train", "no_such_preset", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "presets: " in capsys.readouterr().err and "synapse_20p" not in str(tmp_path)


def test_a_folder_that_is_no_data_set_is_refused_before_training(tmp_path, capsys):
    assert main(["train", "phantom", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "run")]) == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
