"""Private files and folders: what we create holds the user's conversations and
transcript paths, so it is 0600 / 0700 whatever the process umask (often 022).

Every creation point in the state folder, the snapshots, the staging of
``memories.json``, the log and the delivered-ids database goes through here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO, Any

__all__ = ["DIR_MODE", "FILE_MODE", "atomic_write", "private_dir", "private_file", "private_open"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Create ``path`` (and missing parents) as 0700; returns it.

    ``tighten`` also narrows an existing folder to 0700: right for folders that are
    ours alone (the state folder), wrong for shared ones (``~/.claude/logs``).
    Missing parents are created 0700 too: nobody else made them.
    """
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process was quicker
            folder.mkdir(mode=DIR_MODE)
        _chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask
    if tighten and not missing:
        _chmod(path, DIR_MODE)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists and is 0600 (for files a library then opens: SQLite,
    DuckDB, the log handler). SQLite gives its -wal/-shm files the database's mode."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
    _chmod(path, FILE_MODE)
    return path


def private_open(path: Path, mode: str = "wb", **kwargs: Any) -> IO[Any]:
    """``open(path, mode)`` for writing, the file created (or truncated) as 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # an existing file keeps its mode through os.open
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically (a crash leaves old or new), as 0600."""
    private_dir(path.parent, tighten=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with private_open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _chmod(path: Path, mode: int) -> None:
    # Not ours to change (another user's folder) or gone meanwhile: nothing to do.
    with contextlib.suppress(OSError):
        os.chmod(path, mode)


# Recovery of damaged state files (issue 9, fault scenario 8).
def set_aside(path: Path, *siblings: str) -> Path:
    """Move a damaged file out of the way as ``NAME.corrupt-<UTC time>``; never delete
    it (it may hold the user's data). ``siblings`` are suffixes of companion files
    (a database's ``-wal``/``.wal``) moved with it. Returns the new path."""
    import time

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():  # twice in one second: keep both
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}.{n}")
    os.replace(path, target)
    for suffix in siblings:
        companion = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            os.replace(companion, target.with_name(target.name + suffix))
    return target
