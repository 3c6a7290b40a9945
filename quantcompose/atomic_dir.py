"""Write a directory completely beside its target, then swap it in, under a lock.

A crash or ``SIGKILL`` at any point leaves the old directory or the new one
at the target path, complete, never a half-deleted mixture:

1. the new contents are written into a staging directory
   ``.NAME.qc-staging-PID-XXXX`` beside the target;
2. on Linux the staging directory and the target are exchanged in one atomic
   ``renameat2(RENAME_EXCHANGE)``; elsewhere the target is first renamed aside
   (``.NAME.qc-old-PID-XXXX``) and the staging directory renamed in;
3. the old contents, now under a hidden name, are removed, ``marker`` first,
   so a half-removed old directory never looks complete.

An advisory ``flock`` on ``.NAME.qc-lock`` keeps two writers of one target
apart; the kernel drops it when its holder dies, so a killed writer leaves no
stale lock. Whoever next takes the lock cleans up what a dead writer left:
staging directories are removed, and an old directory renamed aside is put
back when the target is missing (the window between the two renames of step 2).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from quantcompose.errors import SaveError

STAGING_TAG = ".qc-staging-"
ASIDE_TAG = ".qc-old-"
LOCK_SUFFIX = ".qc-lock"


def _hidden(target: Path, tag: str, pid: int | None = None) -> Path:
    suffix = "" if pid is None else f"{pid}-{secrets.token_hex(4)}"
    return target.parent / f".{target.name}{tag}{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _leftovers(target: Path, tag: str) -> Iterator[tuple[Path, int]]:
    """``(path, pid)`` of the hidden directories ``tag`` that writers of ``target`` left."""
    pattern = re.compile(re.escape(f".{target.name}{tag}") + r"(\d+)-[0-9a-f]+")
    if not target.parent.is_dir():
        return
    for entry in target.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match:
            yield entry, int(match.group(1))


def was_interrupted(target: Path) -> bool:
    """Whether a writer of ``target`` left an old directory renamed aside (it may have died there)."""
    return any(True for _ in _leftovers(target, ASIDE_TAG))


def remove_tree(path: Path, marker: str | None = None) -> None:
    """Remove ``path``, its ``marker`` file first so that what is left never looks complete."""
    if marker is not None:
        try:
            (path / marker).unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(path, ignore_errors=True)


def recover(target: Path, marker: str) -> None:
    """Clean up after writers of ``target`` that died; call with the lock held.

    An old directory renamed aside goes back to ``target`` when ``target`` is
    missing; every other leftover of a dead writer is removed.
    """
    for aside, pid in sorted(_leftovers(target, ASIDE_TAG)):
        if _pid_alive(pid):
            continue
        if not target.exists() and (aside / marker).is_file():
            os.rename(aside, target)
        else:
            remove_tree(aside, marker)
    for staging, pid in _leftovers(target, STAGING_TAG):
        if not _pid_alive(pid):
            remove_tree(staging, marker)


@contextmanager
def target_lock(target: Path) -> Iterator[None]:
    """Hold the writer's lock of ``target``; :class:`SaveError` if another process holds it."""
    lock = _hidden(target, LOCK_SUFFIX)
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SaveError(
                f"another process is saving to {target} right now; wait for it to finish, or save elsewhere"
            ) from None
        # The holder before us may have unlinked the file after we opened it: lock the one at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` atomically (Linux ``renameat2``); False where that is not supported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _move_aside(target: Path, aside: Path) -> None:
    os.rename(target, aside)


def _move_in(staging: Path, target: Path) -> None:
    os.rename(staging, target)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk, so a swap never exposes unwritten data."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot fsync a directory
            pass
        finally:
            os.close(fd)


def write_directory(target: Path, write: Callable[[Path], None], marker: str, replace: bool) -> None:
    """Run ``write(staging)`` into a fresh staging directory, then put it at ``target``.

    ``replace`` says that an existing ``target`` (already checked by the
    caller to be replaceable) may be replaced; otherwise ``target`` must not
    exist when the lock is taken. ``marker`` is the file whose presence
    makes a directory complete; it is removed first when one is deleted.
    """
    with target_lock(target):
        recover(target, marker)
        if target.exists() and not replace:
            raise SaveError(f"{target} appeared while this save was starting; choose another path")
        staging = _hidden(target, STAGING_TAG, os.getpid())
        staging.mkdir()
        old: Path | None = None
        try:
            write(staging)
            _fsync_tree(staging)
            if not target.exists():
                _move_in(staging, target)
            elif _exchange(staging, target):
                old = staging
            else:
                old = _hidden(target, ASIDE_TAG, os.getpid())
                _move_aside(target, old)
                _move_in(staging, target)
        except BaseException:
            if old is not None and old != staging and old.exists() and not target.exists():
                os.rename(old, target)  # the new one did not make it in: put the old one back
            remove_tree(staging, marker)
            raise
        if old is not None:
            remove_tree(old, marker)
