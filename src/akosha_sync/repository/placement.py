"""Putting restored files in place: nothing replaced that the plan did not see, and no
moment, signal or crash that leaves a database beside a WAL that is not its own.

A restore downloads into temporary files beside the target and checks them; then
:func:`place` runs, in this order, each step leaving every database one that DuckDB
opens (it replays a WAL left beside a database into it, and refuses a WAL that is not
the database's own):

1. **Check again** what the plan saw, since the download may have taken minutes: each
   name exists, or not, as planned (a file that appeared is never overwritten), and no
   running process holds a database that is to be replaced. This process then holds
   that database's lock itself until the end, so no DuckDB client can open it in
   between.
2. **Keep** what is replaced: a hard link ``NAME.bak-<time>`` (or ``.bak-<time>.N``,
   one suffix for every file of the restore, so a database and its WAL stay a pair).
3. **Remove** each old WAL from its place (it is kept as its backup).
4. **Rename** each database into place, then each WAL.

Ctrl-C and SIGTERM wait until the last rename (in the main thread, where signal
handlers run); a failure midway puts back what was there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

__all__ = ["Placement", "PlacementError", "locked_by_other", "place"]

_WAL_SUFFIX = ".wal"


@dataclass(frozen=True)
class Placement:
    """One name in the target: ``temp`` goes to ``path`` (None: nothing does, a stale
    WAL is only set aside); ``replaces``: the plan found a file there, to be kept as
    ``backup`` (the plan's name; a free variant of it is used)."""

    name: str
    path: Path
    temp: Path | None
    replaces: bool
    backup: Path | None


class PlacementError(Exception):
    """Placing failed or was refused; the message says what, and what was put back."""


def locked_by_other(path: Path) -> bool:
    """True when another process holds a POSIX lock on ``path`` (DuckDB does, while open)."""
    fd = _open_for_lock(path)
    if fd is None:
        return False
    try:
        _lock(fd)
    except OSError as exc:
        return exc.errno in (errno.EACCES, errno.EAGAIN)
    finally:
        os.close(fd)  # also drops the probe lock
    return False


def place(items: list[Placement]) -> dict[str, str]:
    """Put every ``temp`` in place, keeping what it replaces; all or nothing. Returns
    the backups kept, by name. Raises :class:`PlacementError` with the target as it was."""
    with _signals_deferred():
        held = _check_and_hold(items)
        try:
            return _place(items)
        finally:
            for fd in held:
                os.close(fd)


def _check_and_hold(items: list[Placement]) -> list[int]:
    held: list[int] = []
    try:
        for item in items:
            there = os.path.lexists(item.path)
            if there and not item.replaces:
                raise PlacementError(
                    f"{item.path} appeared while the restore was downloading; nothing was "
                    "replaced. Look at that file, then restore again (--force keeps it as "
                    "NAME.bak-<time>)."
                )
            if not there or item.name.endswith(_WAL_SUFFIX):
                continue
            fd = _open_for_lock(item.path)
            if fd is None:
                continue
            held.append(fd)
            try:
                _lock(fd)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                raise PlacementError(
                    f"{item.path} was opened by a running process while the restore was "
                    "downloading (it holds DuckDB's lock: Session-Buddy or another DuckDB "
                    "client); nothing was replaced. Close it and restore again."
                ) from None
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return held


def _place(items: list[Placement]) -> dict[str, str]:
    kept: dict[str, str] = {}
    installed: list[str] = []
    paths = {item.name: item.path for item in items}
    # What the plan would replace and is still there (a file gone meanwhile needs no
    # backup: nothing of it is lost by putting the restored one in its place).
    kept_aside = [i for i in items if i.replaces and i.backup and os.path.lexists(i.path)]
    try:
        suffix = _free_suffix([i.backup for i in kept_aside if i.backup])
        for item in kept_aside:
            assert item.backup is not None
            kept[item.name] = _keep_aside(item.path, _with_suffix(item.backup, suffix))
        for item in kept_aside:
            if item.name.endswith(_WAL_SUFFIX) and os.path.lexists(item.path):
                item.path.unlink()
        # Databases first: a new database beside no WAL opens; beside the old one it
        # would not. Then each WAL joins its own database.
        for item in sorted(items, key=lambda i: i.name.endswith(_WAL_SUFFIX)):
            if item.temp is not None:
                os.replace(item.temp, item.path)
                installed.append(item.name)
    except OSError as exc:
        left = _roll_back(paths, kept, installed)
        state = ("what was there is back as it was" if not left else
                 "and putting back what was there failed too: " + "; ".join(left))
        raise PlacementError(f"{exc.strerror or exc}; {state}") from exc
    return kept


def _roll_back(paths: dict[str, Path], kept: dict[str, str], installed: list[str]) -> list[str]:
    """Undo a partial placement; returns what could not be undone (and where it is)."""
    left: list[str] = []
    for name in reversed(installed):
        try:
            if name in kept:
                os.replace(kept.pop(name), paths[name])  # the original back over the new file
            else:
                paths[name].unlink()
        except OSError as exc:
            left.append(f"{paths[name]}: {exc.strerror or exc}")
    for name, backup in kept.items():
        try:
            if os.path.lexists(paths[name]):
                os.unlink(backup)  # a second link to the file still in place
            else:
                os.rename(backup, paths[name])
        except OSError as exc:
            left.append(f"{paths[name]} is kept as {backup} ({exc.strerror or exc})")
    return left


def _keep_aside(path: Path, backup: Path) -> str:
    """Keep ``path`` as ``backup``: a hard link, so ``path`` is never missing until a
    rename replaces it; a rename where the filesystem has no hard links."""
    try:
        os.link(path, backup, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        os.rename(path, backup)
    return str(backup)


def _free_suffix(backups: list[Path]) -> str:
    """'' or '.N': the first that no file in the target has for any of ``backups`` (an
    existing backup, maybe the user's own database, is never overwritten)."""
    for n in itertools.count():
        suffix = f".{n}" if n else ""
        if not any(os.path.lexists(_with_suffix(b, suffix)) for b in backups):
            return suffix
    raise AssertionError("unreachable")


def _with_suffix(backup: Path, suffix: str) -> Path:
    return backup.with_name(backup.name + suffix)


def _open_for_lock(path: Path) -> int | None:
    """A descriptor to test or take a lock with (read-only where writing is not
    allowed: a read lock still meets a writer's lock), or None if it cannot be opened."""
    for flags in (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags)
        except PermissionError:
            continue
        except OSError:
            return None
    return None


def _lock(fd: int) -> None:
    writable = os.O_ACCMODE & fcntl.fcntl(fd, fcntl.F_GETFL) != os.O_RDONLY
    fcntl.lockf(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM are held until the block ends, then handled as they would
    have been. Only the main thread runs signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[signal.Signals] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum))

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for got in dict.fromkeys(caught):
            handler = previous[got]
            if callable(handler):
                handler(got, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(got)
