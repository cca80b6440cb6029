"""What this machine already delivered, kept in ``state_dir``.

Per target (endpoint + bucket + system id, or Akosha URL + system id) a small JSON
file remembers the last upload and, for each database, the stat fingerprint and
source digest of what was stored and where. A lock file keeps two processes on one
machine (the daemon and a CLI run) from uploading at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import structlog

from akosha_sync._fs import atomic_write, private_dir, set_aside
from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.manifest import FileEntry
from akosha_sync.sync.protocol import SyncError
from akosha_sync.sync.snapshot import SourceFingerprint

__all__ = [
    "StoredFile",
    "TargetState",
    "load_state",
    "remove_state",
    "save_state",
    "sync_lock",
    "target_id",
]

log = structlog.get_logger("akosha_sync.state")


class StoredFile(msgspec.Struct, kw_only=True):
    """A database as last stored on a target."""

    fingerprint: SourceFingerprint | None
    entry: FileEntry  # entry.key is where the object lives, in whichever upload


class TargetState(msgspec.Struct, kw_only=True):
    target: str
    system_id: str
    last_upload_id: str | None = None
    last_manifest_key: str | None = None
    files: dict[str, StoredFile] = msgspec.field(default_factory=dict)
    # Record kinds whose export to memories.json this target has run at least once;
    # a database whose kinds are missing here is read again even when unchanged.
    exported_kinds: list[str] = msgspec.field(default_factory=list)


def target_id(*parts: str) -> str:
    """A stable short name for a target, safe in file names."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]


def _state_file(state_dir: Path, tid: str) -> Path:
    return state_dir / "targets" / f"{tid}.json"


def load_state(state_dir: Path, tid: str) -> TargetState | None:
    """The saved state, or None if absent or damaged (it is only a cache).

    A damaged file (truncated, not JSON, wrong shape) is moved aside with a warning,
    so the user can see what happened and it is not read again.
    """
    path = _state_file(state_dir, tid)
    try:
        return msgspec.json.decode(path.read_bytes(), type=TargetState)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        try:
            moved: str = str(set_aside(path))
        except OSError as move_error:
            moved = f"(could not move it aside: {move_error})"
        log.warning(
            f"the upload state file {path.name} is damaged and was moved aside; the "
            "record of what is stored on this target was reset, so the next sync reads "
            "the newest manifest in the bucket (or uploads every database again)",
            file=str(path), moved_to=moved, error=str(exc),
        )
        return None


def save_state(state_dir: Path, tid: str, state: TargetState) -> None:
    """Write atomically: a crash leaves the old state or the new one, never half."""
    atomic_write(_state_file(state_dir, tid), msgspec.json.encode(state))


def remove_state(state_dir: Path, tid: str) -> None:
    """Forget a target's state (absent already is fine)."""
    _state_file(state_dir, tid).unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def restoring_into(config: AkoshaSyncConfig, target: Path) -> AsyncIterator[None]:
    """Around a restore: into ``data_dir`` it holds the upload lock, so no sync reads the
    databases while they are replaced (it waits for a running one, within
    ``upload_timeout_seconds``). A sync of this very process would not stop it otherwise:
    POSIX locks of one process never conflict, and the restore's probe of a database's
    lock would even drop the lock its sync's DuckDB holds. Elsewhere: nothing to hold."""
    if target.resolve() != config.data_path.resolve():
        yield
        return
    async with sync_lock(config.state_path, timeout=config.upload_timeout_seconds):
        yield


@contextlib.asynccontextmanager
async def sync_lock(state_dir: Path, *, timeout: float) -> AsyncIterator[None]:
    """Hold the machine-wide upload lock, waiting up to ``timeout`` seconds for it."""
    private_dir(state_dir)
    path = state_dir / "sync.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise SyncError(
                        f"another akosha-sync process is uploading (lock {path}); "
                        "wait for it to finish, or check `akosha-sync status`."
                    ) from None  # no method failed: the result names the one asked for
                await anyio.sleep(0.1)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
