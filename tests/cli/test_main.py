"""`skcdf` itself: every command group registers, bad input is one `error:` line with status 2."""

import pytest

from skcdf.cli import _COMMAND_MODULES, build_parser, main

COMMANDS = ("phantom", "prepare", "stats", "import-reference", "export", "train", "predict", "watch", "evaluate",
            "report", "overlay", "curves", "compare", "demo", "ablate")


def test_every_command_is_registered(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS), text
    assert len(_COMMAND_MODULES) == 8


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "usage: skcdf " + command in capsys.readouterr().out


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
