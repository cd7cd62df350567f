"""One owner per workdir: an exclusive OS lock held for as long as a command writes into it.

``WORKDIR/.jaxprune.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) by the command
that writes the workdir (`train`, `finetune`, `prune --out`) and holds that process's PID. The
kernel drops the lock when the process ends in any way, ``kill -9`` included, so a stale lock file
never blocks a later run. A second writer is refused before it reads or writes anything, with one
line naming the holder's PID. Readers (`eval`) take no lock: they read committed steps only.

In a multi-process run, process 0 holds the lock (the caller passes ``primary``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".jaxprune.lock"
# What makes a directory a jaxprune workdir (besides the lock file).
_WORKDIR_ENTRIES = ("checkpoints", "metrics.jsonl", "rejected_checkpoints", LOCK_FILE)


class WorkdirError(Exception):
    """A workdir that cannot be used (a file, unwritable, not a workdir); one-line message."""


class WorkdirInUse(WorkdirError):
    """Another process holds the workdir's lock."""


@dataclasses.dataclass
class _Held:
    fd: int
    count: int
    created: list[Path]  # directories this process created for the workdir, deepest first


# This process's locks, so that nested pipeline calls on one workdir do not lock themselves out
# (flock locks of two descriptors of one process exclude each other).
_held: dict[Path, _Held] = {}


def lock_path(workdir: str | os.PathLike) -> Path:
    return Path(workdir).absolute() / LOCK_FILE


def is_workdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory jaxprune wrote (checkpoints, metrics or its lock)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in _WORKDIR_ENTRIES)


def _check_writable(path: Path) -> list[Path]:
    """Refuses a path that cannot become a workdir; returns the directories that are missing."""
    missing = []
    existing = path
    while not existing.exists():
        if existing.is_symlink():
            raise WorkdirError(f"cannot use {path} as a workdir: {existing} is a broken link")
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise WorkdirError(f"cannot use {path} as a workdir: it {where}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WorkdirError(f"cannot use {path} as a workdir: {existing} is not writable")
    return missing


def _holder(lock_file: Path) -> str:
    try:
        pid = lock_file.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _acquire(path: Path, lock_file: Path) -> int:
    """An open descriptor of ``lock_file`` holding its exclusive lock, with our PID written."""
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirInUse(
                f"{path} is in use by {_holder(lock_file)} (it holds {lock_file}); wait for it "
                "to finish or use another workdir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The previous holder may have removed the file (a workdir it created and left empty)
        # between our open and our lock: then our lock is on a deleted file; take the new one.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    pid = f"{os.getpid()}\n".encode()
    if os.pread(fd, 64, 0) != pid:  # Unchanged bytes when this process locked it before.
        os.ftruncate(fd, 0)
        os.pwrite(fd, pid, 0)
    return fd


@contextlib.contextmanager
def owned(workdir: str | os.PathLike, *, new: bool = False, primary: bool = True) -> Iterator[Path]:
    """Holds ``workdir``'s exclusive lock for the block, creating the directory if needed.

    Args:
      workdir: the directory.
      new: the workdir must not hold checkpoints yet, and an existing non-empty directory must be
        a jaxprune workdir (for `prune --out`).
      primary: whether this process locks (process 0 of a multi-process run); the others only
        run the block.

    Yields:
      The absolute path of the workdir.

    Raises:
      WorkdirInUse: another process holds the lock; nothing was changed.
      WorkdirError: the path is a file, lies under one or in an unwritable folder, or (``new``)
        is a used workdir or a non-empty folder that is not a workdir; nothing was changed.

    A lock file (and directory) created here is removed again when nothing else was written (the
    command failed before writing), so a refused command leaves nothing behind.
    """
    path = Path(workdir).absolute()
    if not primary:
        yield path
        return
    if path in _held:
        _held[path].count += 1
        try:
            yield path
        finally:
            _held[path].count -= 1
        return
    missing = _check_writable(path)
    if new and not missing and any(path.iterdir()) and not is_workdir(path):
        raise WorkdirError(
            f"{path} is not empty and is not a jaxprune workdir; give a new output directory"
        )
    lock_existed = (path / LOCK_FILE).exists()
    try:
        for directory in reversed(missing):
            directory.mkdir()
        fd = _acquire(path, path / LOCK_FILE)
    except OSError as e:
        _remove_empty(missing)
        reason = e.strerror or errno.errorcode.get(e.errno, str(e))
        raise WorkdirError(f"cannot use {path} as a workdir: {reason}") from None
    except BaseException:
        _remove_empty(missing)
        raise
    _held[path] = _Held(fd, 1, missing)
    try:
        if new and (path / "checkpoints").is_dir() and any((path / "checkpoints").iterdir()):
            raise WorkdirError(f"{path} already holds checkpoints; give a new output directory")
        yield path
    finally:
        del _held[path]
        with contextlib.suppress(OSError):
            if not lock_existed and [p.name for p in path.iterdir()] == [LOCK_FILE]:
                (path / LOCK_FILE).unlink()
                _remove_empty(missing)
        os.close(fd)


def _remove_empty(created: list[Path]) -> None:
    for directory in created:  # deepest first
        with contextlib.suppress(OSError):
            directory.rmdir()


def writer_pid(workdir: str | os.PathLike) -> int | None:
    """The PID of the process writing ``workdir`` now (this one included), or None; locks nothing.

    Opens the lock file read-only, so it works in a read-only workdir.
    """
    path = Path(workdir).absolute()
    if path in _held:
        return os.getpid()
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # A writer always creates the file first.
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # Also drops the shared lock, if taken.
    return None
