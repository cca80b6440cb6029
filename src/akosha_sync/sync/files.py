"""The files layout of a cloud sync: each database and WAL as one whole object.

Per database: reuse the stored objects untouched if the stat fingerprint of the
database and its WAL matches the last upload; else snapshot both (a verified copy,
:mod:`akosha_sync.sync.snapshot`), then per file reuse the stored object if its
SHA-256 is unchanged, else stream it (zstd, SHA-256 of the stored bytes, multipart).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import obstore
import structlog

from akosha_sync.repository.manifest import FileEntry
from akosha_sync.repository.store import with_retries
from akosha_sync.sync.protocol import CloudUploadError, ProgressCallback, SnapshotError
from akosha_sync.sync.snapshot import fingerprint as source_fingerprint
from akosha_sync.sync.snapshot import take_snapshot
from akosha_sync.sync.state import StoredFile, TargetState
from akosha_sync.sync.upload import log_carried_over

if TYPE_CHECKING:
    from akosha_sync.sync.upload import CloudContext, Upload

__all__ = ["Send", "carry_over", "check_reused", "send", "sync_database"]

log = structlog.get_logger("akosha_sync.cloud")

_WAL_SUFFIX = ".wal"


class Send(msgspec.Struct, frozen=True):
    """One object to upload: its file name in the upload, the local copy, its SHA-256."""

    name: str
    path: Path
    sha256: str
    fingerprint: Any  # SourceFingerprint of a database; None for its WAL
    extra: dict[str, Any]  # FileEntry fields known from the snapshot



async def check_reused(method: CloudContext, upload: Upload) -> None:
    """Right before the commit: every object this upload takes from an earlier one is
    still there (a prune may have run meanwhile), as the blocks layout lists its packs
    again. Raises ``CloudUploadError``, nothing committed, if one is gone."""
    gone = [entry.key for entry in upload.files.values()
            if entry.reused_from and not await _object_intact(method, entry)]
    if gone:
        raise CloudUploadError(
            f"{len(gone)} object(s) this upload reuses left the bucket during the sync "
            f"(e.g. {gone[0]}; did a prune run?); nothing was committed. Sync again."
        )


async def _object_intact(method: CloudContext, entry: FileEntry) -> bool:
    if entry.key in method.condemned or "*" in method.condemned:
        return False  # a prune is about to delete it: store it again

    async def head() -> bool:
        try:
            meta = await obstore.head_async(method.store, entry.key)
        except FileNotFoundError:
            return False
        return int(meta["size"]) == entry.stored_size

    return await with_retries(head, config=method.config, what=f"checking {entry.key}")


async def sync_database(
    method: CloudContext,
    upload: Upload,
    state: TargetState | None,
    name: str,
    path: Path,
    snapshot_dir: Path,
    progress: ProgressCallback,
) -> list[Send]:
    """Decide, per object (database, WAL), to reuse it or send it; returns the sends."""
    config = method.config
    fp = source_fingerprint(path)
    if fp is None:
        upload.missing.append(name)
        log.info("database missing; skipped", database=str(path))
        return []
    wal_name = name + _WAL_SUFFIX
    previous = state.files if (state and config.enable_deduplication) else {}
    stored_db = previous.get(name)
    stored_wal = previous.get(wal_name) if fp.wal is not None else None
    if (
        stored_db is not None
        and stored_db.fingerprint == fp
        and method._records_exported(state, name)
        and (fp.wal is None or stored_wal is not None)
        and await _object_intact(method, stored_db.entry)
        and (stored_wal is None or await _object_intact(method, stored_wal.entry))
    ):
        # Not even re-read: size, mtime and inode of both files are unchanged.
        _reuse(upload, name, stored_db.entry, fp)
        if stored_wal is not None:
            _reuse(upload, wal_name, stored_wal.entry, None)
        return []
    progress(f"snapshot:{name}", 0, fp.db.size + (fp.wal.size if fp.wal else 0))
    try:
        snap = await anyio.to_thread.run_sync(take_snapshot, name, path, snapshot_dir)
    except FileNotFoundError:
        upload.missing.append(name)
        return []
    except SnapshotError as exc:
        upload.errors.append(str(exc))
        log.error("database not readable; skipped", database=str(path), error=str(exc))
        await carry_over(method, upload, state, name)
        return []
    upload.snapshots[name] = snap
    sends: list[Send] = []
    db_extra = {
        "conversation_count": snap.conversation_count,
        "wal": wal_name if snap.wal else None,
    }
    if (
        stored_db is not None
        and stored_db.entry.sha256 == snap.sha256
        and await _object_intact(method, stored_db.entry)
    ):
        _reuse(upload, name, stored_db.entry, snap.fingerprint, **db_extra)
    else:
        sends.append(Send(name, Path(snap.path), snap.sha256, snap.fingerprint, db_extra))
    if snap.wal and snap.wal_sha256:
        stored_wal = previous.get(wal_name)
        if (
            stored_wal is not None
            and stored_wal.entry.sha256 == snap.wal_sha256
            and await _object_intact(method, stored_wal.entry)
        ):
            _reuse(upload, wal_name, stored_wal.entry, None)
        else:
            sends.append(Send(wal_name, Path(snap.wal), snap.wal_sha256, None, {}))
    return sends


async def send(
    method: CloudContext, upload: Upload, item: Send, progress: ProgressCallback
) -> None:
    """Upload one planned object and record it (uploads run side by side: the CPU
    work of one overlaps the network wait of another)."""
    key = method._get_cloud_path(item.name, upload.upload_id)
    entry = await method._upload_file(
        item.path,
        key,
        upload,
        compress=method.config.enable_compression,
        progress=progress,
        phase=f"upload:{item.name}",
        known_sha256=item.sha256,
    )
    entry = msgspec.structs.replace(entry, **item.extra)
    upload.files[item.name] = entry
    upload.uploaded_keys.append(key)
    upload.new_state[item.name] = StoredFile(fingerprint=item.fingerprint, entry=entry)


async def carry_over(
    method: CloudContext, upload: Upload, state: TargetState | None, name: str
) -> None:
    """A database that could not be read, or that this sync was not asked for, keeps
    its last stored objects in this upload (as blocks.py's ``_carry_over``: else
    ``restore latest`` brings back half the memory)."""
    stored = state.files if state else {}
    if name not in stored:
        return
    # Its WAL only if the stored version had one: the state may still hold the WAL of an
    # older version (a checkpoint since), which DuckDB refuses beside this one.
    wal = stored[name].entry.wal
    names = [name, *([wal] if wal and wal in stored else [])]
    for n in names:
        if not await _object_intact(method, stored[n].entry):
            return
    for n in names:
        entry = stored[n].entry
        origin = _origin(entry)
        upload.files[n] = msgspec.structs.replace(entry, reused_from=origin)
        # The old fingerprint: the next sync reads the database again.
        upload.new_state[n] = stored[n]
        upload.carried_over[n] = origin
    log_carried_over(upload, name)


def _reuse(
    upload: Upload, name: str, entry: FileEntry, fp: Any, **extra: Any
) -> None:
    reused = msgspec.structs.replace(entry, reused_from=_origin(entry), **extra)
    upload.files[name] = reused
    upload.unchanged.append(name)
    upload.new_state[name] = StoredFile(fingerprint=fp, entry=reused)
    log.info("unchanged; reusing the stored object", file=name, key=entry.key)


def _origin(entry: FileEntry) -> str:
    """The upload whose folder holds the object (``.../uploads/{id}/{name}``)."""
    return entry.reused_from or entry.key.split("/")[-2]
