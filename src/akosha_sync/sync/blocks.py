"""The blocks layout of a cloud sync: each database read once into the repository.

Per database: when its stat fingerprint matches the last upload and every pack it
used is still in the bucket, its pieces are reused without reading it; otherwise it
is held still (:mod:`akosha_sync.repository.source`: DuckDB's shared lock, or a
verified copy when a writer holds it), cut into pieces, and the pieces no stored pack
holds go into new packs (:mod:`akosha_sync.repository.writer`). Its records then go
into memories.json through the same connection (one state for pieces and records),
and only then is it let go: one database is held, and open in DuckDB, at a time.

Pieces known to be stored come from the last upload, or, for a database it lacks
(away from the data folder for a sync) or when it is gone (forgotten), from the newest
earlier upload that holds the database; and from an upload a restore put on disk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import obstore
import structlog

from akosha_sync.repository.format import (
    LAYOUT_BLOCKS,
    Index,
    PackRef,
    Piece,
    decode_index,
    encode_index,
    index_key,
)
from akosha_sync.repository.manifest import (
    COMPRESSION_FORMAT,
    FileEntry,
    Manifest,
    carried_over_from,
    decode_manifest,
    manifest_key,
    upload_id_order,
    uploads_prefix,
)
from akosha_sync.repository.prune import condemned_pack_ids
from akosha_sync.repository.restored import restored_manifest_key
from akosha_sync.repository.source import LockedByWriter, Source, open_copy, open_locked
from akosha_sync.repository.store import with_retries
from akosha_sync.repository.writer import (
    RepositoryWriter,
    list_packs,
    reusable_pieces,
    stored_size,
)
from akosha_sync.sync.protocol import CloudUploadError, ProgressCallback, SnapshotError
from akosha_sync.sync.snapshot import fingerprint as source_fingerprint
from akosha_sync.sync.snapshot import take_snapshot
from akosha_sync.sync.state import StoredFile, TargetState
from akosha_sync.sync.upload import log_carried_over

if TYPE_CHECKING:
    from akosha_sync.sync.memories import MemoriesUpload
    from akosha_sync.sync.upload import CloudContext, Upload

__all__ = ["sync_blocks"]

log = structlog.get_logger("akosha_sync.cloud")

_WAL_SUFFIX = ".wal"
# Earlier uploads looked at, newest first, for one holding a database the last lacks.
_LOOK_BACK = 20
# How long to wait for a writer to let go of a database before copying it instead.
_LOCK_WAIT_SECONDS = 1.0


async def _previous_upload(
    method: CloudContext, state: TargetState | None
) -> tuple[Manifest | None, Index | None]:
    """The last upload's manifest and index (blocks layout): what can be reused, and
    what a database not read this time is kept at (also with deduplication off)."""
    key = state.last_manifest_key if state else None
    if key is None:
        return None, None
    return await _upload_at(method, key, "reading the last upload")


async def _restored_index(method: CloudContext, previous: Manifest | None) -> Index | None:
    """The index of the upload a restore put into data_dir since the last commit, when
    it is not the last upload (repository/restored.py): its pieces are on disk now."""
    key = restored_manifest_key(method.config) if method.config.enable_deduplication else None
    if key is None or (previous is not None and key == manifest_key(
            previous.system_id, previous.upload_id)):
        return None
    _, index = await _upload_at(method, key, "reading the restored upload")
    return index


async def _upload_at(
    method: CloudContext, key: str, what: str
) -> tuple[Manifest | None, Index | None]:
    """The manifest at ``key`` and its index (None, None when absent or damaged)."""

    async def get(key: str) -> bytes | None:
        try:
            return bytes(await (await obstore.get_async(method.store, key)).bytes_async())
        except FileNotFoundError:
            return None

    async def both() -> tuple[Manifest | None, Index | None]:
        data = await get(key)
        if data is None:
            return None, None
        try:
            manifest = decode_manifest(data)
            if manifest.storage_layout != LAYOUT_BLOCKS or not manifest.index:
                return manifest, None
            raw = await get(manifest.index)
            return manifest, decode_index(raw) if raw is not None else None
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None, None  # a damaged earlier upload: store everything anew

    return await with_retries(both, config=method.config, what=what)


class _Earlier:
    """The system's uploads, newest first, listed once (when first asked for)."""

    def __init__(self, method: CloudContext) -> None:
        self.method = method
        self._ids: list[str] | None = None

    async def ids(self) -> list[str]:
        if self._ids is None:
            sid = self.method.config.system_id_resolved

            async def newest_first() -> list[str]:
                listing = await obstore.list_with_delimiter_async(
                    self.method.store, prefix=uploads_prefix(sid))
                ids = [p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]]
                return sorted(ids, key=upload_id_order, reverse=True)

            self._ids = await with_retries(newest_first, config=self.method.config,
                                           what="listing the uploads")
        return self._ids


async def _newest_holding(
    method: CloudContext, earlier: _Earlier, name: str | None, skip: frozenset[str]
) -> tuple[Manifest | None, Index | None]:
    """The newest committed upload (among the last :data:`_LOOK_BACK`, ``skip`` left
    out) whose index holds ``name`` (None: any). For when the last upload is gone (a
    forget) or lacks a database (missing from the data folder for a while): its
    pieces are reused, and it is what a database not read this time is kept at."""
    sid = method.config.system_id_resolved
    ids = await earlier.ids()
    for uid in [u for u in ids if u not in skip][:_LOOK_BACK]:
        manifest, index = await _upload_at(method, manifest_key(sid, uid),
                                           "reading an earlier upload")
        if index is not None and (name is None or name in index.files):
            return manifest, index
    return None, None


async def _references(
    method: CloudContext, earlier: _Earlier, upload: Upload, state: TargetState | None,
    previous: Manifest | None, previous_index: Index | None,
    wanted: list[tuple[str, Path]],
) -> dict[str, tuple[Manifest, Index]]:
    """Per database, the upload its pieces are reused from and that it is kept at when
    not read: the last one, or for one that upload lacks, the newest that holds it
    (looked for only for a database on disk, or one not asked for)."""
    refs: dict[str, tuple[Manifest, Index]] = {}
    for name in method.config.database_paths:
        if previous is not None and previous_index is not None and (
                name in previous_index.files):
            refs[name] = (previous, previous_index)
    if state is None:
        return refs  # a first sync: nothing earlier to look for
    skip = frozenset({previous.upload_id} if previous else ())
    look = [n for n, path in wanted if path.exists()] + list(upload.not_selected)
    for name in look:
        if name not in refs:
            manifest, index = await _newest_holding(method, earlier, name, skip)
            if manifest is not None and index is not None:
                refs[name] = (manifest, index)
    return refs


async def sync_blocks(
    method: CloudContext,
    upload: Upload,
    state: TargetState | None,
    wanted: list[tuple[str, Path]],
    snapshot_dir: Path,
    progress: ProgressCallback,
    memories: MemoriesUpload | None = None,
) -> None:
    """Store the databases as pieces in packs and write the upload's index; with
    ``memories``, export each database's records right after its pieces."""
    config = method.config
    sid = config.system_id_resolved
    previous, previous_index = await _previous_upload(method, state)
    earlier = _Earlier(method)
    if previous_index is None and state is not None and state.last_manifest_key:
        # The last upload is gone (forgotten) or unreadable: the newest one left.
        previous, previous_index = await _newest_holding(method, earlier, None, frozenset())
    refs = await _references(method, earlier, upload, state, previous, previous_index,
                             wanted)
    restored = await _restored_index(method, previous)
    listed = await list_packs(method.store, config, sid)
    usable = condemned_pack_ids(method.condemned, listed)
    known: dict[str, Piece] = {}
    known_packs: dict[str, PackRef] = {}
    sources = [previous_index, *(index for _, index in refs.values()), restored]
    seen: set[int] = set()
    for index in sources:  # each once; an earlier source wins over a later one
        if index is None or id(index) in seen:
            continue
        seen.add(id(index))
        also, also_packs = reusable_pieces(index, usable)
        known = {**also, **known}
        known_packs = {**also_packs, **known_packs}
    if not config.enable_deduplication:
        known = {}  # every piece read is stored anew; the packs stay known for carry-over
    writer = RepositoryWriter(
        method.store, config, system_id=sid, upload_id=upload.upload_id, known=known,
        known_packs=known_packs, compress=config.enable_compression,
        on_written=upload.written.append, existing=frozenset(listed),
        condemned=method.condemned,
    )
    async with writer.running():
        for name, path in wanted:
            ref, ref_index = refs.get(name, (None, None))
            await _blocks_database(
                method, upload, state, writer, ref, ref_index, name, path,
                snapshot_dir, progress, memories,
            )
        for name in upload.not_selected:
            ref, ref_index = refs.get(name, (None, None))
            _carry_over(upload, state, writer, ref, ref_index, name)
    index = writer.index()
    upload.bytes_sent += writer.bytes_new
    upload.bytes_new += writer.bytes_new
    upload.uploaded_keys.extend(
        ref.key for pid, ref in index.packs.items() if pid not in known_packs
    )
    if index.packs:
        # Every pack the index names, the reused and the new, checked again right before
        # the commit: a prune may have run meanwhile (and taken a sync that slept for
        # hours for an abandoned one).
        listed = await list_packs(method.store, config, sid)
        gone = sorted(ref.key for p, ref in index.packs.items() if listed.get(p) != ref.size)
        if gone:
            raise CloudUploadError(
                f"{len(gone)} pack(s) this upload needs left the bucket during the sync "
                f"(e.g. {gone[0]}; did a prune run?); nothing was committed. Sync again."
            )
    if not index.files:
        return
    key = index_key(sid, upload.upload_id)
    body = encode_index(index)

    async def put() -> None:
        upload.written.append(key)
        await obstore.put_async(method.store, key, body)

    await with_retries(put, config=config, what=f"writing {key}")
    upload.bytes_sent += len(body)
    upload.uploaded_keys.append(key)
    upload.index_key = key
    upload.bytes_new += len(body)
    compressed = COMPRESSION_FORMAT if config.enable_compression else None
    for name, entry in index.files.items():
        extra = upload.extra.get(name, {})
        new_pieces = int(extra.pop("new_pieces", 0))
        file_entry = FileEntry(
            key=key, original_size=entry.size, stored_size=stored_size(entry),
            sha256=entry.sha256, stored_sha256=entry.sha256, compression=compressed,
            pieces=len(entry.pieces), new_pieces=new_pieces, **extra,
        )
        upload.files[name] = file_entry
        upload.new_state[name] = StoredFile(
            fingerprint=upload.fingerprints.get(name), entry=file_entry
        )
        if new_pieces == 0 and name not in upload.unchanged and name not in upload.carried_over:
            upload.unchanged.append(name)

async def _blocks_database(
    method: CloudContext,
    upload: Upload,
    state: TargetState | None,
    writer: RepositoryWriter,
    previous: Manifest | None,
    previous_index: Index | None,
    name: str,
    path: Path,
    snapshot_dir: Path,
    progress: ProgressCallback,
    memories: MemoriesUpload | None,
) -> None:
    config = method.config
    fp = source_fingerprint(path)
    if fp is None:
        upload.missing.append(name)
        log.info("database missing; skipped", database=str(path))
        return
    wal_name = name + _WAL_SUFFIX
    names = [name, wal_name] if fp.wal is not None else [name]
    stored = state.files.get(name) if state and config.enable_deduplication else None
    if (
        state is not None
        and stored is not None
        and stored.fingerprint == fp
        and method._records_exported(state, name)
        and previous is not None
        and previous_index is not None
        and all(
            n in previous_index.files and writer.can_reuse(previous_index.files[n])
            # the version stored then, not an older one (the last upload forgotten)
            and (held := state.files.get(n)) is not None
            and held.entry.sha256 == previous_index.files[n].sha256
            for n in names
        )
    ):
        # Not even re-read: size, mtime and inode of both files are unchanged.
        for n in names:
            _reuse_previous(upload, writer, previous, previous_index, n)
            upload.unchanged.append(n)
        upload.fingerprints[name] = fp
        log.info("unchanged; reusing the stored pieces", file=name)
        return
    progress(f"snapshot:{name}", 0, fp.db.size + (fp.wal.size if fp.wal else 0))
    opened = await _open_source(method, upload, name, path, snapshot_dir)
    if opened is None:
        if name not in upload.missing:
            _carry_over(upload, state, writer, previous, previous_index, name)
        return
    source, held_fp = opened
    # Held (still locked) until its records are exported; on failure _sync closes it.
    upload.sources[name] = source
    upload.how_read[name] = "locked" if source.locked else "copy"
    phase = f"upload:{name}"
    total = source.db_size + source.wal_size
    db = await writer.add_file(
        name, source.db_fd, database=True, size=source.db_size,
        on_progress=lambda n: progress(phase, n, total),
    )
    upload.extra[name] = {
        "new_pieces": db.new_pieces,
        "conversation_count": source.conversation_count,
        "row_counts": source.row_counts,
        "wal": wal_name if source.wal_fd is not None else None,
    }
    if source.wal_fd is not None:
        wal = await writer.add_file(
            wal_name, source.wal_fd, database=False, size=source.wal_size,
            block_size=db.file.block_size,
            on_progress=lambda n: progress(phase, source.db_size + n, total),
        )
        upload.extra[wal_name] = {"new_pieces": wal.new_pieces}
    upload.fingerprints[name] = held_fp
    if memories is not None and (kinds := method._kinds_of(name)):
        # Its records, from the very state its pieces were cut from.
        await memories.add(source.con, kinds)
    # Nothing more to read from it: let a writer in now.
    await anyio.to_thread.run_sync(upload.sources.pop(name).close)


def _reuse_previous(
    upload: Upload, writer: RepositoryWriter, previous: Manifest, previous_index: Index,
    name: str,
) -> None:
    """Put the previous upload's ``name`` in this one, pieces and manifest details."""
    writer.reuse_file(name, previous_index.files[name])
    old = previous.file_details.get(name)
    upload.extra[name] = {
        "conversation_count": old.conversation_count if old else None,
        "wal": old.wal if old else None,
        "row_counts": old.row_counts if old else None,
    }


def _carry_over(
    upload: Upload,
    state: TargetState | None,
    writer: RepositoryWriter,
    previous: Manifest | None,
    previous_index: Index | None,
    name: str,
) -> None:
    """A database that could not be read, or that this sync was not asked for
    (``upload_knowledge_graph=False``, ...), keeps its last stored version in this upload.

    Otherwise the upload, the newest one, would hold the other database only, and a
    ``restore latest`` would bring back half the memory with no word said. Its pieces
    are checked as any reused piece is; its fingerprint stays the old one, so the next
    sync reads the database again.
    """
    if previous is None or previous_index is None or name not in previous_index.files:
        return
    names = [n for n in (name, name + _WAL_SUFFIX) if n in previous_index.files]
    if not all(writer.can_reuse(previous_index.files[n]) for n in names):
        return
    for n in names:
        _reuse_previous(upload, writer, previous, previous_index, n)
        # Carried over again: the version is still the one that upload stored.
        upload.carried_over[n] = carried_over_from(previous).get(n) or previous.upload_id
    stored = state.files.get(name) if state else None
    if stored is not None:
        upload.fingerprints[name] = stored.fingerprint
    log_carried_over(upload, name)


async def _open_source(
    method: CloudContext, upload: Upload, name: str, path: Path, snapshot_dir: Path
) -> tuple[Source, Any] | None:
    """Hold the live database still under DuckDB's shared lock; when a writer holds
    it, copy it (sync/snapshot.py) and read the copy. None: missing or unreadable."""
    temp = snapshot_dir / ".duckdb-tmp"

    def open_it() -> tuple[Source, Any]:
        import duckdb

        deadline = time.monotonic() + _LOCK_WAIT_SECONDS
        delay = 0.005
        try:
            while True:
                try:
                    source = open_locked(path, temp)
                    return source, source_fingerprint(path)
                except LockedByWriter:
                    if time.monotonic() >= deadline:
                        break
                    # A writer that opens and closes (a session ending) leaves gaps.
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)
            log.info("database open for writing; taking a copy", database=str(path))
        except duckdb.Error as exc:
            raise SnapshotError(
                f"{path} is not a readable DuckDB database ({exc}). Check that it is a "
                "Session-Buddy database written by DuckDB >= 2.0; it was not uploaded.",
                str(path),
                exc,
            ) from exc
        snap = take_snapshot(name, path, snapshot_dir)
        return open_copy(Path(snap.path), temp), snap.fingerprint

    try:
        return await anyio.to_thread.run_sync(open_it)
    except FileNotFoundError:
        upload.missing.append(name)
        return None
    except SnapshotError as exc:
        upload.errors.append(str(exc))
        log.error("database not readable; skipped", database=str(path), error=str(exc))
        return None
