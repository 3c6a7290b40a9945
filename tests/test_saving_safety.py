"""Saving never destroys what the user had: overwrite rules, atomic replacement, locking, killed saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import quantcompose.atomic_dir as atomic_dir
import quantcompose.saving as saving
from quantcompose.errors import SaveError, SaveTargetExistsError
from quantcompose.pipeline import quantize_model
from quantcompose.saving import check_save_target, load_quantized, save_quantized
from quantcompose.strategy import QuantSettings

from toymodel import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    m = tiny_llama()
    quantize_model(m, torch.randint(0, 128, (2, 16)), "rtn", QuantSettings(wbits=4, abits=8), {}, progress=False)
    return m


def _metadata(path):
    return json.loads((path / saving.CONFIG_NAME).read_text())["metadata"]


def _hidden_leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_overwrite_replaces_a_saved_model_and_leaves_nothing_else(model, tmp_path):
    target = tmp_path / "m"
    save_quantized(model, target, metadata={"run": 1})
    save_quantized(model, target, metadata={"run": 2}, overwrite=True)
    assert _metadata(target) == {"run": 2}
    load_quantized(target)
    assert _hidden_leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_of_other_files(model, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    with pytest.raises(SaveError, match=r"mine exists and is not a saved quantcompose model"):
        save_quantized(model, target, overwrite=True)
    assert (target / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_replaces_a_file(model, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(SaveError, match="is not a directory"):
        save_quantized(model, target, overwrite=True)
    assert target.read_text() == "keep me"


def test_an_existing_path_without_overwrite_is_refused(model, tmp_path):
    save_quantized(model, tmp_path / "m")
    with pytest.raises(SaveTargetExistsError, match="already exists"):
        save_quantized(model, tmp_path / "m")


@pytest.mark.parametrize("path", ["", "   "])
def test_an_empty_path_is_refused(path):
    with pytest.raises(SaveError, match="save path is empty"):
        check_save_target(path)


def test_a_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SaveError, match="is not a directory"):
        check_save_target(tmp_path / "file" / "m")


def test_an_unwritable_parent_is_refused(tmp_path):
    if os.geteuid() != 0:
        readonly = tmp_path / "ro"
        readonly.mkdir()
        readonly.chmod(0o555)
        parent = readonly
    else:  # root writes through permission bits; /sys refuses new entries
        parent = Path("/sys")
        try:
            (parent / "qc-write-test").mkdir()
        except OSError:
            pass
        else:
            (parent / "qc-write-test").rmdir()
            pytest.skip("/sys is writable here")
    with pytest.raises(SaveError, match="is not writable"):
        check_save_target(parent / "m")


def test_a_failed_write_keeps_the_old_model(model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_quantized(model, target, metadata={"run": 1})

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saving, "save_file", broken)
    with pytest.raises(SaveError, match="the disk is full; nothing was changed"):
        save_quantized(model, target, metadata={"run": 2}, overwrite=True)
    assert _metadata(target) == {"run": 1}
    load_quantized(target)
    assert _hidden_leftovers(tmp_path) == []


def test_without_an_atomic_exchange_a_failed_move_puts_the_old_model_back(model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_quantized(model, target, metadata={"run": 1})
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)

    def broken(staging, target):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic_dir, "_move_in", broken)
    with pytest.raises(SaveError, match="Input/output error"):
        save_quantized(model, target, metadata={"run": 2}, overwrite=True)
    assert _metadata(target) == {"run": 1}
    assert _hidden_leftovers(tmp_path) == []


def test_without_an_atomic_exchange_overwrite_still_works(model, tmp_path, monkeypatch):
    target = tmp_path / "m"
    save_quantized(model, target, metadata={"run": 1})
    monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
    save_quantized(model, target, metadata={"run": 2}, overwrite=True)
    assert _metadata(target) == {"run": 2}
    assert _hidden_leftovers(tmp_path) == []


def test_two_saves_to_one_path_cannot_both_succeed(model, tmp_path):
    target = tmp_path / "m"
    with atomic_dir.target_lock(target):  # another save holds the path
        with pytest.raises(SaveError, match="another process is saving to"):
            save_quantized(model, target)
    assert not target.exists()
    save_quantized(model, target)  # the lock is gone with its holder


def test_a_lock_from_another_process_blocks_until_it_dies(model, tmp_path):
    target = tmp_path / "m"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pathlib import Path
            from quantcompose.atomic_dir import target_lock
            with target_lock(Path({str(target)!r})):
                print("locked", flush=True)
                time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / ".shim")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveError, match="another process"):
            save_quantized(model, target)
    finally:
        holder.kill()
        holder.wait()
    save_quantized(model, target)  # the kernel dropped the dead holder's lock
    assert _hidden_leftovers(tmp_path) == []


def test_leftovers_of_dead_saves_are_cleaned_and_live_ones_kept(model, tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".m{atomic_dir.STAGING_TAG}{dead}-abcd1234"
    running = tmp_path / f".m{atomic_dir.STAGING_TAG}{alive}-abcd1234"
    for d in (stale, running):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    save_quantized(model, tmp_path / "m")
    assert not stale.exists() and running.exists()


def _die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def _save_killed_at(model, target, step, monkeypatch):
    """Run an overwriting save in a forked child that SIGKILLs itself at ``step``; returns its wait status."""
    if step == "write":
        monkeypatch.setattr(saving, "save_file", _die)
    elif step == "remove-old":
        monkeypatch.setattr(atomic_dir, "remove_tree", _die)
    else:  # between the two renames of the fallback for file systems without an atomic exchange
        monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
        monkeypatch.setattr(atomic_dir, "_move_in", _die)
    pid = os.fork()  # the child shares the quantized model and the imports: no second start-up
    if pid == 0:
        try:
            save_quantized(model, target, metadata={"run": 2}, overwrite=True)
        finally:
            os._exit(3)  # only reached if the kill did not happen
    _, status = os.waitpid(pid, 0)
    monkeypatch.undo()
    return status


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("step, survivor", [("write", 1), ("remove-old", 2), ("between-renames", 1)])
def test_a_save_killed_at_any_step_leaves_a_loadable_model(model, tmp_path, step, survivor, monkeypatch):
    target = tmp_path / "m"
    save_quantized(model, target, metadata={"run": 1})
    status = _save_killed_at(model, target, step, monkeypatch)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    load_quantized(target)  # puts back a model renamed aside, if that is where the kill left it
    assert _metadata(target) == {"run": survivor}
    # Whatever the killed save left behind is hidden, and complete when it looks like a model ...
    for leftover in tmp_path.iterdir():
        if leftover != target:
            assert leftover.name.startswith(".")
            if (leftover / saving.CONFIG_NAME).exists():
                load_quantized(leftover)
    save_quantized(model, target, metadata={"run": 3}, overwrite=True)
    assert _hidden_leftovers(tmp_path) == []  # ... and the next save cleans it up
