"""The cloud method: snapshots of the databases, streamed to an S3-compatible store
(or a local folder) through obstore, committed by a manifest written last.

One sync, in order:

1. reserve an upload id with a conditional create (two syncs never share one);
2. per database: reuse the stored objects untouched if the stat fingerprint of the
   database and its WAL matches the last upload; else snapshot both, then per file
   (database, WAL) reuse the stored object if its SHA-256 is unchanged, else stream
   it (zstd, SHA-256 of the stored bytes, multipart) and check the stored size.
   Uploads start as soon as their snapshot is taken and run side by side;
3. write ``memories.json`` (conversations new since the last upload) for Akosha;
4. write ``manifest.json`` with a conditional create. Until then the upload is
   invisible to Akosha; on failure the objects written so far are removed.

That is the ``files`` layout. With ``storage_layout = "blocks"`` (the default) step 2
is the repository's (:mod:`akosha_sync.repository`): each database is held still
under DuckDB's shared lock (or copied when a writer holds it, see
``repository/source.py``), read once and cut into pieces; only pieces no stored pack
holds are compressed into new packs, and ``index.json`` lists where every piece is.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import obstore
import structlog
from obstore.exceptions import AlreadyExistsError

from akosha_sync import __version__
from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.format import (
    LAYOUT_BLOCKS,
    LAYOUT_FILES,
    Index,
    decode_index,
    encode_index,
    index_key,
)
from akosha_sync.repository.source import LockedByWriter, Source, open_copy, open_locked
from akosha_sync.repository.writer import (
    RepositoryWriter,
    list_packs,
    reusable_pieces,
    stored_size,
)
from akosha_sync.sync import records
from akosha_sync.sync.manifest import (
    COMPRESSION_FORMAT,
    MEMORIES_NAME,
    FileEntry,
    Manifest,
    build_manifest,
    claim_key,
    decode_manifest,
    encode_manifest,
    make_upload_id,
    manifest_key,
    memories_key,
    object_key,
    upload_id_order,
    uploads_prefix,
)
from akosha_sync.sync.protocol import (
    CloudUploadError,
    ProgressCallback,
    SnapshotError,
    SyncResult,
)
from akosha_sync.sync.snapshot import Snapshot, remove_snapshot_dir, take_snapshot
from akosha_sync.sync.snapshot import fingerprint as source_fingerprint
from akosha_sync.sync.state import StoredFile, TargetState, load_state, save_state, target_id
from akosha_sync.sync.store import MIN_PART_SIZE, make_store, with_retries

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["CloudSyncMethod", "cloud_target_id"]

log = structlog.get_logger("akosha_sync.cloud")

# zstd-1: ~2x the speed of zstd-3 for a few percent more bytes; measured in bench/.
_ZSTD_LEVEL = 1
# Read size; obstore assembles parts itself, so bigger reads only add memory.
_BLOCK = 1024 * 1024
# Parts in flight per object (objects upload side by side): keeps 250 MB under 150 MB RSS.
_MAX_CONCURRENCY = 2
_MAX_ID_ATTEMPTS = 50
# How long to wait for a writer to let go of a database before copying it instead.
_LOCK_WAIT_SECONDS = 1.0


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


_WAL_SUFFIX = ".wal"


class _Send(msgspec.Struct, frozen=True):
    """One object to upload: its file name in the upload, the local copy, its SHA-256."""

    name: str
    path: Path
    sha256: str
    fingerprint: Any  # SourceFingerprint of a database; None for its WAL
    extra: dict[str, Any]  # FileEntry fields known from the snapshot


class _Upload:
    """Mutable bookkeeping of one sync in progress."""

    def __init__(self, upload_id: str) -> None:
        self.upload_id = upload_id
        self.written: list[str] = []  # keys written by this sync, for cleanup
        self.files: dict[str, FileEntry] = {}
        self.uploaded_keys: list[str] = []
        self.unchanged: list[str] = []
        self.missing: list[str] = []
        self.errors: list[str] = []
        self.snapshots: dict[str, Snapshot] = {}
        self.new_state: dict[str, StoredFile] = {}
        self.exported_ids: list[str] = []  # marked delivered once the manifest is written
        self.bytes_sent = 0
        # Blocks layout: memories.json written while its database was held still; the
        # index key, new bytes, and per-file manifest fields known from the source.
        self.memories_path: Path | None = None
        self.index_key: str | None = None
        self.bytes_new = 0
        self.extra: dict[str, dict[str, Any]] = {}
        self.fingerprints: dict[str, Any] = {}
        # Per database read: "locked" (the live files under DuckDB's shared lock) or
        # "copy" (a writer held it: a verified private copy).
        self.how_read: dict[str, str] = {}


def cloud_target_id(config: AkoshaSyncConfig) -> str:
    """The key of this target's local state: endpoint, bucket and system id."""
    return target_id(
        "cloud", config.cloud_endpoint, config.cloud_bucket, config.system_id_resolved
    )


class CloudSyncMethod:
    """Sync the Session-Buddy databases to S3/R2/MinIO/SeaweedFS or a ``file://`` folder."""

    def __init__(
        self,
        config: AkoshaSyncConfig,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        problems = config.validate()
        if problems:
            raise ValueError("invalid akosha-sync configuration: " + "; ".join(problems))
        self.config = config
        self._clock = clock or (lambda: datetime.now(UTC))
        self._store: ObjectStore | None = None

    # ------------------------------------------------------------- protocol
    def is_available(self) -> bool:
        """True when a bucket is configured (reachability is found out by syncing)."""
        return self.config.cloud_configured

    def get_method_name(self) -> str:
        return "cloud"

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = make_store(self.config)
        return self._store

    @property
    def target_id(self) -> str:
        return cloud_target_id(self.config)

    def _generate_upload_id(self, attempt: int = 0) -> str:
        return make_upload_id(self.config.system_id_resolved, self._clock(), attempt)

    def _get_cloud_path(self, db_name: str, upload_id: str) -> str:
        return object_key(db_name, upload_id, self.config.system_id_resolved)

    async def _compute_sha256(self, file_path: Path) -> str:
        def digest() -> str:
            h = hashlib.sha256()
            with file_path.open("rb") as fh:
                while chunk := fh.read(_BLOCK):
                    h.update(chunk)
            return h.hexdigest()

        return await anyio.to_thread.run_sync(digest)

    async def sync(
        self,
        upload_reflections: bool = True,
        upload_knowledge_graph: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Upload the databases; return the seed's result dict (plus extras).

        Raises ``CloudUploadError`` when the store cannot be used (unreachable, bad
        credentials, missing bucket, timeout). A database that cannot be read is
        reported in the result (``success`` False) while the other one still syncs.
        Keyword ``progress``: a ``(phase, done, total)`` callback.
        """
        progress: ProgressCallback = kwargs.get("progress") or _no_progress
        started = time.monotonic()
        try:
            with anyio.fail_after(self.config.upload_timeout_seconds):
                result = await self._sync(upload_reflections, upload_knowledge_graph, progress)
        except TimeoutError as exc:
            raise CloudUploadError(
                f"cloud sync did not finish within upload_timeout_seconds="
                f"{self.config.upload_timeout_seconds}s; nothing was committed. Raise the "
                "timeout for large databases or slow links.",
                original=exc,
            ) from exc
        result.duration_seconds = round(time.monotonic() - started, 3)
        return result.to_dict()

    # ------------------------------------------------------------ the work
    async def _sync(
        self, reflections: bool, knowledge_graph: bool, progress: ProgressCallback
    ) -> SyncResult:
        config = self.config
        sid = config.system_id_resolved
        tid = self.target_id
        state = load_state(config.state_path, tid)
        upload = await self._claim_upload_id()
        log.info("sync started", method="cloud", upload_id=upload.upload_id)
        snapshot_dir = config.state_path / "snapshots" / upload.upload_id
        try:
            if state is None and config.enable_deduplication:
                state = await self._remote_reference(sid, tid)
            wanted = [
                (name, path)
                for (name, path), keep in zip(
                    config.database_paths.items(), (reflections, knowledge_graph), strict=True
                )
                if keep
            ]
            blocks = config.storage_layout == LAYOUT_BLOCKS
            try:
                if blocks:
                    await self._sync_blocks(upload, state, wanted, snapshot_dir, progress)
                else:
                    # A database's uploads start as soon as its snapshot is taken, so the
                    # next snapshot's copying overlaps them.
                    async with anyio.create_task_group() as tg:
                        for name, path in wanted:
                            for item in await self._sync_database(
                                upload, state, name, path, snapshot_dir, progress
                            ):
                                tg.start_soon(self._send, upload, item, progress)
            except ExceptionGroup as group:
                # One failed upload cancels the others; report the failure, not the group.
                raise _first_failure(group) from None
            if not upload.files:
                raise _NothingToUpload(upload)
            conversations = await self._export_memories(upload, state, tid, progress)
            manifest = build_manifest(
                system_id=sid,
                upload_id=upload.upload_id,
                uploaded_at=self._clock(),
                files=upload.files,
                conversation_count=conversations,
                metadata={
                    "tool": "akosha-sync",
                    "tool_version": __version__,
                    "hostname": socket.gethostname(),
                    "missing_databases": upload.missing,
                    "failed_databases": upload.errors,
                },
                storage_layout=LAYOUT_BLOCKS if blocks else LAYOUT_FILES,
                index=upload.index_key,
                bytes_new=upload.bytes_new if blocks else upload.bytes_sent,
            )
            key = manifest_key(sid, upload.upload_id)
            progress("manifest", 0, 0)
            await self._put_small(key, encode_manifest(manifest), upload, create=True)
        except _NothingToUpload:
            await self._discard(upload)
            return SyncResult(
                method="cloud",
                success=False,
                upload_id=upload.upload_id,
                files_missing=upload.missing,
                error="; ".join(upload.errors)
                or f"no Session-Buddy database found in {config.data_path} "
                f"(looked for {', '.join(config.database_paths)}); nothing was uploaded. "
                "Check data_dir.",
            )
        except BaseException:
            await self._discard(upload)
            raise
        finally:
            await anyio.to_thread.run_sync(remove_snapshot_dir, snapshot_dir)

        self._commit_state(state, tid, sid, upload, key)
        upload.uploaded_keys.append(key)
        log.info(
            "sync committed",
            upload_id=upload.upload_id,
            uploaded=upload.uploaded_keys,
            unchanged=upload.unchanged,
            bytes_sent=upload.bytes_sent,
        )
        return SyncResult(
            method="cloud",
            success=not upload.errors,
            files_uploaded=upload.uploaded_keys,
            bytes_transferred=upload.bytes_sent,
            upload_id=upload.upload_id,
            error="; ".join(upload.errors) or None,
            files_unchanged=upload.unchanged,
            files_missing=upload.missing,
            bytes_stored=manifest.total_size_bytes,
            manifest_key=key,
            conversation_count=manifest.conversation_count,
            details={"snapshots": upload.how_read} if upload.how_read else {},
        )

    async def _claim_upload_id(self) -> _Upload:
        """Reserve a fresh upload id; the first contact with the store, so it fails fast."""
        sid = self.config.system_id_resolved
        for attempt in range(_MAX_ID_ATTEMPTS):
            upload_id = self._generate_upload_id(attempt)
            key = claim_key(sid, upload_id)
            body = msgspec.json.encode(
                {"upload_id": upload_id, "host": socket.gethostname(), "claimed_at": str(
                    self._clock().isoformat())}
            )

            async def put(key: str = key, body: bytes = body) -> bool:
                try:
                    await obstore.put_async(self.store, key, body, mode="create")
                except AlreadyExistsError:
                    return False
                return True

            if await with_retries(
                put, config=self.config, what="reserving an upload id", connect_attempts=2
            ):
                upload = _Upload(upload_id)
                upload.written.append(key)
                upload.bytes_sent += len(body)
                return upload
        raise CloudUploadError(
            f"could not reserve an upload id after {_MAX_ID_ATTEMPTS} attempts; "
            "is another machine using the same system_id?"
        )

    async def _remote_reference(self, sid: str, tid: str) -> TargetState | None:
        """Without local state, the newest committed manifest tells what is stored."""

        async def newest() -> TargetState | None:
            listing = await obstore.list_with_delimiter_async(
                self.store, prefix=uploads_prefix(sid)
            )
            prefixes = sorted(
                listing["common_prefixes"],
                key=lambda prefix: upload_id_order(prefix.rstrip("/").rsplit("/", 1)[-1]),
                reverse=True,
            )
            for prefix in prefixes[:20]:
                key = f"{prefix.rstrip('/')}/manifest.json"
                try:
                    data = await (await obstore.get_async(self.store, key)).bytes_async()
                except FileNotFoundError:
                    continue
                try:
                    manifest = decode_manifest(bytes(data))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue
                return TargetState(
                    target=tid,
                    system_id=sid,
                    last_upload_id=manifest.upload_id,
                    last_manifest_key=key,
                    files={
                        name: StoredFile(fingerprint=None, entry=entry)
                        for name, entry in manifest.file_details.items()
                        if name != MEMORIES_NAME
                    },
                )
            return None

        return await with_retries(newest, config=self.config, what="reading the last manifest")

    async def _object_intact(self, entry: FileEntry) -> bool:
        async def head() -> bool:
            try:
                meta = await obstore.head_async(self.store, entry.key)
            except FileNotFoundError:
                return False
            return int(meta["size"]) == entry.stored_size

        return await with_retries(head, config=self.config, what=f"checking {entry.key}")

    async def _sync_database(
        self,
        upload: _Upload,
        state: TargetState | None,
        name: str,
        path: Path,
        snapshot_dir: Path,
        progress: ProgressCallback,
    ) -> list[_Send]:
        """Decide, per object (database, WAL), to reuse it or send it; returns the sends."""
        config = self.config
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
            and (fp.wal is None or stored_wal is not None)
            and await self._object_intact(stored_db.entry)
            and (stored_wal is None or await self._object_intact(stored_wal.entry))
        ):
            # Not even re-read: size, mtime and inode of both files are unchanged.
            self._reuse(upload, name, stored_db.entry, fp)
            if stored_wal is not None:
                self._reuse(upload, wal_name, stored_wal.entry, None)
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
            return []
        upload.snapshots[name] = snap
        sends: list[_Send] = []
        db_extra = {
            "conversation_count": snap.conversation_count,
            "wal": wal_name if snap.wal else None,
        }
        if (
            stored_db is not None
            and stored_db.entry.sha256 == snap.sha256
            and await self._object_intact(stored_db.entry)
        ):
            self._reuse(upload, name, stored_db.entry, snap.fingerprint, **db_extra)
        else:
            sends.append(_Send(name, Path(snap.path), snap.sha256, snap.fingerprint, db_extra))
        if snap.wal and snap.wal_sha256:
            stored_wal = previous.get(wal_name)
            if (
                stored_wal is not None
                and stored_wal.entry.sha256 == snap.wal_sha256
                and await self._object_intact(stored_wal.entry)
            ):
                self._reuse(upload, wal_name, stored_wal.entry, None)
            else:
                sends.append(_Send(wal_name, Path(snap.wal), snap.wal_sha256, None, {}))
        return sends

    async def _send(self, upload: _Upload, item: _Send, progress: ProgressCallback) -> None:
        """Upload one planned object and record it (uploads run side by side: the CPU
        work of one overlaps the network wait of another)."""
        key = self._get_cloud_path(item.name, upload.upload_id)
        entry = await self._upload_file(
            item.path,
            key,
            upload,
            compress=self.config.enable_compression,
            progress=progress,
            phase=f"upload:{item.name}",
            known_sha256=item.sha256,
        )
        entry = msgspec.structs.replace(entry, **item.extra)
        upload.files[item.name] = entry
        upload.uploaded_keys.append(key)
        upload.new_state[item.name] = StoredFile(fingerprint=item.fingerprint, entry=entry)

    def _reuse(
        self, upload: _Upload, name: str, entry: FileEntry, fp: Any, **extra: Any
    ) -> None:
        origin = entry.reused_from or entry.key.split("/")[-2]
        reused = msgspec.structs.replace(entry, reused_from=origin, **extra)
        upload.files[name] = reused
        upload.unchanged.append(name)
        upload.new_state[name] = StoredFile(fingerprint=fp, entry=reused)
        log.info("unchanged; reusing the stored object", file=name, key=entry.key)

    async def _upload_file(
        self,
        path: Path,
        key: str,
        upload: _Upload,
        *,
        compress: bool,
        progress: ProgressCallback,
        phase: str,
        known_sha256: str | None = None,
    ) -> FileEntry:
        """Stream one file to ``key``; hashes and sizes are taken on the way.

        ``known_sha256`` (from the snapshot copy) spares hashing the original again.
        """
        total = path.stat().st_size
        part = max(self.config.chunk_size_mb * 1024 * 1024, MIN_PART_SIZE)

        async def attempt() -> FileEntry:
            sink = _Digests(compress, hash_original=known_sha256 is None)
            upload.written.append(key)
            if total <= part:
                data = await anyio.to_thread.run_sync(sink.whole, path)
                await obstore.put_async(self.store, key, data, use_multipart=False)
            else:
                await obstore.put_async(
                    self.store,
                    key,
                    sink.stream(path, part, lambda n: progress(phase, n, total)),
                    use_multipart=True,
                    chunk_size=part,
                    max_concurrency=_MAX_CONCURRENCY,
                )
            meta = await obstore.head_async(self.store, key)
            if int(meta["size"]) != sink.stored_size:
                raise CloudUploadError(
                    f"stored object {key} has {meta['size']} bytes, expected "
                    f"{sink.stored_size}; the store lost data. Try again."
                )
            progress(phase, total, total)
            original = known_sha256 or sink.original.hexdigest()
            return FileEntry(
                key=key,
                original_size=sink.original_size,
                stored_size=sink.stored_size,
                sha256=original,
                stored_sha256=sink.stored.hexdigest() if compress else original,
                compression=COMPRESSION_FORMAT if compress else None,
            )

        entry = await with_retries(attempt, config=self.config, what=f"uploading {key}")
        upload.bytes_sent += entry.stored_size
        return entry

    async def _put_small(self, key: str, body: bytes, upload: _Upload, *, create: bool) -> None:
        async def put() -> None:
            await obstore.put_async(self.store, key, body, mode="create" if create else None)

        await with_retries(put, config=self.config, what=f"writing {key}")
        upload.written.append(key)
        upload.bytes_sent += len(body)

    async def _export_memories(
        self, upload: _Upload, state: TargetState | None, tid: str, progress: ProgressCallback
    ) -> int:
        """Write memories.json (new conversations); returns the manifest's count."""
        config = self.config
        name = config.reflection_db
        snap = upload.snapshots.get(name)
        if not config.export_memories:
            if snap is not None:
                return snap.conversation_count
            entry = upload.files.get(name)
            return (entry.conversation_count or 0) if entry else 0
        out = config.state_path / "snapshots" / upload.upload_id / MEMORIES_NAME
        progress("export:memories", 0, 0)
        ids: list[str] = []
        if upload.memories_path is not None:
            ids = upload.exported_ids  # written while the database was held still
        elif snap is not None:
            ids = await anyio.to_thread.run_sync(self._write_memories, Path(snap.path), out, tid)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text('{"conversations": []}\n', encoding="utf-8")
        key = memories_key(config.system_id_resolved, upload.upload_id)
        entry = await self._upload_file(
            out, key, upload, compress=False, progress=progress, phase="upload:memories"
        )
        upload.files[MEMORIES_NAME] = msgspec.structs.replace(entry, conversation_count=len(ids))
        upload.bytes_new += entry.stored_size
        upload.uploaded_keys.append(key)
        upload.exported_ids = ids
        return len(ids)

    def _write_memories(self, snapshot: Path, out: Path, tid: str) -> list[str]:
        con = records.open_snapshot(snapshot, self._progress_db)
        try:
            return records.write_memories_json(
                con, out, system_id=self.config.system_id_resolved, channel=tid
            )
        finally:
            con.close()

    def _write_memories_from(self, source: Source, out: Path, tid: str) -> list[str]:
        """Export from the held source's own connection: the same state as its bytes."""
        records.open_progress(source.con, self._progress_db)
        out.parent.mkdir(parents=True, exist_ok=True)
        return records.write_memories_json(
            source.con, out, system_id=self.config.system_id_resolved, channel=tid
        )

    # ------------------------------------------------------- blocks layout
    async def _previous_upload(
        self, state: TargetState | None
    ) -> tuple[Manifest | None, Index | None]:
        """The last upload's manifest and index (blocks layout): what can be reused."""
        key = state.last_manifest_key if state else None
        if key is None or not self.config.enable_deduplication:
            return None, None

        async def get(key: str) -> bytes | None:
            try:
                return bytes(await (await obstore.get_async(self.store, key)).bytes_async())
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

        return await with_retries(both, config=self.config, what="reading the last upload")

    async def _sync_blocks(
        self,
        upload: _Upload,
        state: TargetState | None,
        wanted: list[tuple[str, Path]],
        snapshot_dir: Path,
        progress: ProgressCallback,
    ) -> None:
        """Store the databases as pieces in packs and write the upload's index."""
        config = self.config
        sid = config.system_id_resolved
        previous, previous_index = await self._previous_upload(state)
        known, known_packs = reusable_pieces(
            previous_index, await list_packs(self.store, config, sid)
        )
        writer = RepositoryWriter(
            self.store, config, system_id=sid, upload_id=upload.upload_id, known=known,
            known_packs=known_packs, compress=config.enable_compression,
            on_written=upload.written.append,
        )
        async with writer.running():
            for name, path in wanted:
                await self._blocks_database(
                    upload, state, writer, previous, previous_index, name, path,
                    snapshot_dir, progress,
                )
        index = writer.index()
        upload.bytes_sent += writer.bytes_new
        upload.bytes_new += writer.bytes_new
        upload.uploaded_keys.extend(
            ref.key for pid, ref in index.packs.items() if pid not in known_packs
        )
        reused = {pid for pid in index.packs if pid in known_packs}
        if reused:
            # Checked again right before the commit: a prune may have run meanwhile.
            listed = await list_packs(self.store, config, sid)
            gone = sorted(
                index.packs[p].key for p in reused if listed.get(p) != index.packs[p].size
            )
            if gone:
                raise CloudUploadError(
                    f"{len(gone)} pack(s) this upload reuses left the bucket during the sync "
                    f"(e.g. {gone[0]}; did a prune run?); nothing was committed. Sync again."
                )
        if not index.files:
            return
        key = index_key(sid, upload.upload_id)
        body = encode_index(index)
        await self._put_small(key, body, upload, create=False)
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
            if new_pieces == 0 and name not in upload.unchanged:
                upload.unchanged.append(name)

    async def _blocks_database(
        self,
        upload: _Upload,
        state: TargetState | None,
        writer: RepositoryWriter,
        previous: Manifest | None,
        previous_index: Index | None,
        name: str,
        path: Path,
        snapshot_dir: Path,
        progress: ProgressCallback,
    ) -> None:
        config = self.config
        fp = source_fingerprint(path)
        if fp is None:
            upload.missing.append(name)
            log.info("database missing; skipped", database=str(path))
            return
        wal_name = name + _WAL_SUFFIX
        names = [name, wal_name] if fp.wal is not None else [name]
        stored = state.files.get(name) if state and config.enable_deduplication else None
        if (
            stored is not None
            and stored.fingerprint == fp
            and previous is not None
            and previous_index is not None
            and all(
                n in previous_index.files and writer.can_reuse(previous_index.files[n])
                for n in names
            )
        ):
            # Not even re-read: size, mtime and inode of both files are unchanged.
            for n in names:
                writer.reuse_file(n, previous_index.files[n])
                old = previous.file_details.get(n)
                upload.extra[n] = {
                    "conversation_count": old.conversation_count if old else None,
                    "wal": old.wal if old else None,
                    "row_counts": old.row_counts if old else None,
                }
                upload.unchanged.append(n)
            upload.fingerprints[name] = fp
            log.info("unchanged; reusing the stored pieces", file=name)
            return
        progress(f"snapshot:{name}", 0, fp.db.size + (fp.wal.size if fp.wal else 0))
        opened = await self._open_source(upload, name, path, snapshot_dir)
        if opened is None:
            return
        source, held_fp = opened
        upload.how_read[name] = "locked" if source.locked else "copy"
        phase = f"upload:{name}"
        try:
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
            if name == config.reflection_db and config.export_memories:
                out = snapshot_dir / MEMORIES_NAME
                progress("export:memories", 0, 0)
                upload.exported_ids = await anyio.to_thread.run_sync(
                    self._write_memories_from, source, out, self.target_id
                )
                upload.memories_path = out
        finally:
            # Only now, after the last read, may a writer open the database again.
            await anyio.to_thread.run_sync(source.close)
        upload.fingerprints[name] = held_fp

    async def _open_source(
        self, upload: _Upload, name: str, path: Path, snapshot_dir: Path
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

    @property
    def _progress_db(self) -> Path:
        return self.config.state_path / "delivered.duckdb"

    def _commit_state(
        self, state: TargetState | None, tid: str, sid: str, upload: _Upload, key: str
    ) -> None:
        """After the manifest: remember what is stored and which rows were exported."""
        files = dict(state.files) if state else {}
        files.update(upload.new_state)
        save_state(
            self.config.state_path,
            tid,
            TargetState(
                target=tid,
                system_id=sid,
                last_upload_id=upload.upload_id,
                last_manifest_key=key,
                files=files,
            ),
        )
        if upload.exported_ids:
            import duckdb

            con = duckdb.connect()
            try:
                records.open_progress(con, self._progress_db)
                records.mark_delivered(con, tid, "conversation", upload.exported_ids)
            finally:
                con.close()

    async def _discard(self, upload: _Upload) -> None:
        """Best effort: remove what a failed sync wrote (never a committed manifest)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for key in reversed(upload.written):
                try:
                    await obstore.delete_async(self.store, key)
                except Exception as exc:  # the store may be the very thing that failed
                    log.debug("cleanup failed", key=key, error=str(exc)[:200])
                    return


def _first_failure(group: BaseExceptionGroup[Exception]) -> Exception:
    leaves: list[Exception] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        elif isinstance(exc, Exception):
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, CloudUploadError)), leaves[0])


class _NothingToUpload(Exception):
    def __init__(self, upload: _Upload) -> None:
        self.upload = upload


class _Digests:
    """SHA-256 of original and stored bytes, and zstd in between, chunk by chunk."""

    def __init__(self, compress: bool, *, hash_original: bool = True) -> None:
        self.hash_original = hash_original
        self.original = hashlib.sha256()
        self.stored = hashlib.sha256()
        self.original_size = 0
        self.stored_size = 0
        self._compressor: Any = None
        if compress:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compressobj()

    def _feed(self, data: bytes, final: bool) -> bytes:
        if self.hash_original:
            self.original.update(data)
        self.original_size += len(data)
        if self._compressor is not None:
            out = self._compressor.compress(data)
            if final:
                out += self._compressor.flush()
            self.stored.update(out)
        else:
            out = data
        self.stored_size += len(out)
        return bytes(out)

    def whole(self, path: Path) -> bytes:
        return self._feed(path.read_bytes(), final=True)

    async def stream(
        self, path: Path, part: int, on_progress: Callable[[int], None]
    ) -> AsyncIterator[bytes]:
        with path.open("rb") as fh:

            block = min(part, _BLOCK)

            def next_block() -> tuple[bytes, bool]:
                data = fh.read(block)
                return self._feed(data, final=len(data) < block), len(data) < block

            while True:
                out, final = await anyio.to_thread.run_sync(next_block)
                on_progress(self.original_size)
                if out:
                    yield out
                if final:
                    return
