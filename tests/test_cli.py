"""The command line: help, methods, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantcompose.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("methods", "quantize", "eval"):
        assert command in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "quantcompose.cli", "methods"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "duquant" in result.stdout and "rtn" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["quantize", "--method", "nosuch"], "unknown method 'nosuch'"),
        (["quantize", "--wbits", "9"], "wbits=9"),
        (["quantize", "--abits", "0"], "abits=0"),
        (["quantize", "--opt", "nosuch=1"], "no option"),
        (["quantize", "--model", "/no/such/model/dir"], "smollm2-135m"),
    ],
)
def test_bad_input_is_a_clear_error(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("quantcompose: error:")
    assert message in err
