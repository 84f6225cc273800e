"""`skcdf watch`: its options are checked before it connects to anything."""

import pytest

from skcdf.cli import main


@pytest.mark.parametrize("options, message", [
    (["--max-polls", "0"], "--max-polls 0: must be at least 1"),
    (["--interval", "-1"], "--interval and --settle must not be negative"),
])
def test_bad_options_are_refused(options, message, run_folder, capsys):
    run, _ = run_folder
    assert main(["watch", str(run), "--dicomweb", "http://127.0.0.1:9/dicom-web", *options]) == 2
    assert message in capsys.readouterr().err


def test_the_pacs_is_required(run_folder, capsys):
    run, _ = run_folder
    with pytest.raises(SystemExit) as exit_info:
        main(["watch", str(run)])
    assert exit_info.value.code == 2 and "--dicomweb" in capsys.readouterr().err
