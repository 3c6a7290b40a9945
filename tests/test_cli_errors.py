"""Every bad input to the CLI is one clear line and exit code 2, found before any work is wasted on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantcompose.cli as cli
import quantcompose.saving as saving
from quantcompose.cli import main
from quantcompose.data import load_wikitext2_test

from toymodel import CharTokenizer, tiny_llama


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""

    def refuse(name):
        raise AssertionError(f"the model {name} was loaded before the bad input was found")

    monkeypatch.setattr(cli, "_load", refuse)


@pytest.fixture
def toy(monkeypatch):
    """The CLI loads the toy model; quantizing or evaluating it fails the test unless a test allows it."""
    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the bad input was found")

    monkeypatch.setattr("quantcompose.pipeline.quantize_model", refuse)
    monkeypatch.setattr("quantcompose.evaluate.perplexity", refuse)


def _error(capsys, argv, code=2):
    assert main(argv) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("a few words of text\n" * 40)
    return path


def _file(tmp_path, data: bytes) -> Path:
    path = tmp_path / "data.txt"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seqlen", "0"], "--seqlen must be at least 2, got 0"),
        (["--seqlen", "1"], "--seqlen must be at least 2, got 1"),
        (["--calib-seqlen", "0"], "--calib-seqlen must be at least 1"),
        (["--nsamples", "0"], "--nsamples must be at least 1"),
        (["--max-windows", "0"], "--max-windows must be at least 1"),
        (["--group-size", "0"], "--group-size must be at least 1, got 0"),
        (["--group-size", "-4"], "--group-size must be at least 1"),
        (["--seed", "-1"], r"--seed must be in [0, 2**63)"),
        (["--seed", str(2**63)], r"--seed must be in [0, 2**63)"),
        (["--save", ""], "the save path is empty"),
        (["--eval-data", "/no/such/file.txt"], "file not found: /no/such/file.txt"),
        (["--calib", "/no/such/calib.txt"], "calibration (--calib) file not found"),
    ],
)
def test_bad_arguments_are_refused_before_loading(argv, message, capsys, no_load):
    assert message in _error(capsys, ["quantize", *argv])


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "is empty"),
        (b"  \n\n ", "is empty"),
        (b"text\x00\x01\x02binary", "is binary (it holds NUL bytes at offset 4)"),
        (b"caf\xe9 latin-1", "is not UTF-8 text (invalid byte at offset 3)"),
    ],
)
def test_a_bad_evaluation_file_is_refused_before_loading(data, message, tmp_path, capsys, no_load):
    path = _file(tmp_path, data)
    for command in ("quantize", "eval"):
        assert message in _error(capsys, [command, "--eval-data", str(path)])


def test_a_byte_order_mark_is_dropped(tmp_path):
    plain, marked = tmp_path / "plain.txt", tmp_path / "bom.txt"
    plain.write_bytes("héllo wörld\n".encode())
    marked.write_bytes(b"\xef\xbb\xbf" + "héllo wörld\n".encode())
    tokenizer = CharTokenizer()
    assert torch.equal(load_wikitext2_test(tokenizer, marked), load_wikitext2_test(tokenizer, plain))


def test_a_directory_as_evaluation_file_is_refused(tmp_path, capsys, no_load):
    assert "(it is a directory)" in _error(capsys, ["quantize", "--eval-data", str(tmp_path)])


def test_existing_save_targets_are_refused_before_loading(tmp_path, capsys, no_load):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert "already exists" in _error(capsys, ["quantize", "--save", str(mine)])
    assert "is not a saved quantcompose model" in _error(capsys, ["quantize", "--save", str(mine), "--overwrite"])
    assert (mine / "notes.txt").read_text() == "keep"


def test_an_unwritable_save_target_is_refused_before_loading(capsys, no_load):
    try:
        Path("/sys/qc-write-test").mkdir()
    except OSError:
        pass
    else:
        Path("/sys/qc-write-test").rmdir()
        pytest.skip("/sys is writable here")
    assert "is not writable" in _error(capsys, ["quantize", "--save", "/sys/qc/model"])


def _saved_toy(tmp_path):
    from quantcompose.pipeline import quantize_model
    from quantcompose.strategy import QuantSettings

    model = tiny_llama()
    quantize_model(model, torch.randint(0, 128, (2, 16)), "rtn", QuantSettings(wbits=4, abits=8), {}, progress=False)
    saving.save_quantized(model, tmp_path / "saved")
    return tmp_path / "saved"


def test_quantizing_a_saved_model_is_refused_with_the_right_command(tmp_path, capsys, no_load):
    saved = _saved_toy(tmp_path)
    line = _error(capsys, ["quantize", "--model", str(saved)])
    assert "already quantized" in line and "quantcompose eval" in line


def test_an_incomplete_saved_model_names_the_missing_manifest(tmp_path, capsys):
    saved = _saved_toy(tmp_path)
    (saved / saving.CONFIG_NAME).unlink()
    line = _error(capsys, ["eval", "--model", str(saved), "--eval-data", str(tmp_path / "none.txt")])
    assert "file not found" in line  # the cheap check comes first ...
    (tmp_path / "t.txt").write_text("text " * 100)
    line = _error(capsys, ["eval", "--model", str(saved), "--eval-data", str(tmp_path / "t.txt")])
    assert "not a saved quantcompose model (no quantcompose.json)" in line  # ... then no config.json hint
    assert "config.json" not in line


def test_eval_without_data_is_a_clear_error(capsys, no_load):
    assert "eval needs --eval-data" in _error(capsys, ["eval"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seqlen", "512", "--eval-data", "TEXT"], "--seqlen 512 is longer than the model's context of 256 tokens"),
        (["--calib-seqlen", "300"], "--calib-seqlen 300 is longer than the model's context of 256"),
        (["--group-size", "7"], "--group-size 7 does not divide the input width 96"),
    ],
)
def test_what_needs_the_model_is_checked_before_any_work(argv, message, text, capsys, toy):
    argv = ["--calib-seqlen", "8", *[str(text) if a == "TEXT" else a for a in argv]]
    assert message in _error(capsys, ["quantize", *argv])


def test_the_default_seqlen_does_not_matter_without_evaluation(capsys, monkeypatch, toy):
    monkeypatch.setattr("quantcompose.pipeline.quantize_model", _interrupt)
    assert main(["quantize", "--calib-seqlen", "8", "--nsamples", "1"]) == 130  # got as far as quantizing


def test_an_evaluation_text_shorter_than_one_window_is_refused_before_any_work(tmp_path, capsys, toy):
    short = _file(tmp_path, b"only a few characters")
    line = _error(capsys, ["quantize", "--eval-data", str(short), "--seqlen", "64", "--calib-seqlen", "8"])
    assert "fewer than one window of --seqlen 64" in line


def test_a_calibration_text_too_short_is_refused_before_any_work(tmp_path, capsys, toy):
    short = _file(tmp_path, b"short calibration text")
    line = _error(capsys, ["quantize", "--calib", str(short), "--calib-seqlen", "64"])
    assert "one sample needs seqlen=64" in line


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_quantize_is_one_line_and_exit_130(capsys, monkeypatch, toy):
    monkeypatch.setattr("quantcompose.pipeline.quantize_model", _interrupt)
    assert _error(capsys, ["quantize", "--nsamples", "1", "--calib-seqlen", "8"], code=130) == "quantcompose: interrupted"


def test_ctrl_c_during_save_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))

    monkeypatch.setattr(saving, "save_file", _interrupt)
    argv = ["quantize", "--method", "rtn", "--nsamples", "1", "--calib-seqlen", "8", "--quiet",
            "--save", str(tmp_path / "m")]
    assert _error(capsys, argv, code=130) == "quantcompose: interrupted"
    assert list(tmp_path.iterdir()) == []


def test_a_save_reports_its_size_against_float16(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda name: (tiny_llama(), CharTokenizer()))
    argv = ["quantize", "--method", "rtn", "--nsamples", "1", "--calib-seqlen", "8", "--quiet",
            "--save", str(tmp_path / "m")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"saved to {tmp_path / 'm'}: " in out and "x the float16 model" in out and "transforms" in out
    saving.load_quantized(tmp_path / "m")
