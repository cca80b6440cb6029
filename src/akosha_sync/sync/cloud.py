"""The cloud method: snapshots of the databases, streamed to an S3-compatible store
(or a local folder) through obstore, committed by a manifest written last.

One sync, in order:

1. reserve an upload id with a conditional create (two syncs never share one); a
   claim the sync does not go on with is deleted (prune waits for claims);
2. per database: reuse the stored objects untouched if the stat fingerprint of the
   database and its WAL matches the last upload; else snapshot both, then per file
   (database, WAL) reuse the stored object if its SHA-256 is unchanged, else stream
   it (zstd, SHA-256 of the stored bytes, multipart) and check the stored size.
   Uploads start as soon as their snapshot is taken and run side by side;
3. stream ``memories.json`` for Akosha (:mod:`akosha_sync.sync.memories`, rendered
   straight into its upload, never written to disk): every record not yet delivered
   on this target (conversations, reflections, entities, like the HTTP method), all
   in its ``conversations`` list, each marked by its kind in ``metadata.record_type``;
4. write ``manifest.json`` with a conditional create. Until then the upload is
   invisible to Akosha; on failure before it the objects written so far are removed.
   Once its PUT was tried nothing is removed: a lost answer is resolved by reading
   the manifest back (`store.commit_manifest`).

That is the ``files`` layout (step 2 in :mod:`akosha_sync.sync.files`). With
``storage_layout = "blocks"`` (the default, :mod:`akosha_sync.sync.blocks`) step 2
is the repository's (:mod:`akosha_sync.repository`): each database is held still
under DuckDB's shared lock (or copied when a writer holds it, see
``repository/source.py``), read once and cut into pieces; only pieces no stored pack
holds are compressed into new packs, and ``index.json`` lists where every piece is.
Each database stays held until its records have gone into memories.json from the
same connection (right after its pieces), so memories.json and the pieces are of
one state, and only one database is open in DuckDB at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import obstore
import structlog

from akosha_sync import __version__
from akosha_sync.config import AkoshaSyncConfig, endpoint_identity
from akosha_sync.repository import multipart
from akosha_sync.repository.damaged import read_damaged
from akosha_sync.repository.format import LAYOUT_BLOCKS, LAYOUT_FILES
from akosha_sync.repository.manifest import (
    COMPRESSION_FORMAT,
    MEMORIES_NAME,
    FileEntry,
    build_manifest,
    claim_key,
    decode_manifest,
    encode_manifest,
    make_upload_id,
    manifest_key,
    memories_key,
    object_key,
    upload_id_order,
    upload_id_time,
    uploads_prefix,
)
from akosha_sync.repository.prune import IN_FLIGHT_STALE, in_flight_rule, read_condemned
from akosha_sync.repository.restored import clear_restored
from akosha_sync.repository.store import (
    commit_manifest,
    create_once,
    make_store,
    part_size,
    with_retries,
)
from akosha_sync.sync import records
from akosha_sync.sync.blocks import sync_blocks
from akosha_sync.sync.deadline import Deadline
from akosha_sync.sync.files import carry_over, check_reused, send, sync_database
from akosha_sync.sync.memories import MemoriesUpload
from akosha_sync.sync.protocol import (
    CloudUploadError,
    ProgressCallback,
    SyncResult,
)
from akosha_sync.sync.snapshot import remove_snapshot_dir
from akosha_sync.sync.state import (
    StoredFile,
    TargetState,
    load_state,
    remove_state,
    save_state,
    target_id,
)
from akosha_sync.sync.upload import Upload

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["CloudSyncMethod", "cloud_target_id", "load_cloud_state"]

log = structlog.get_logger("akosha_sync.cloud")

# zstd-1: ~2x the speed of zstd-3 for a few percent more bytes; measured in bench/.
_ZSTD_LEVEL = 1
# Read size; obstore assembles parts itself, so bigger reads only add memory.
_BLOCK = 1024 * 1024
# Parts in flight per object (objects upload side by side): keeps 250 MB under 150 MB RSS.
_MAX_CONCURRENCY = 2
_MAX_ID_ATTEMPTS = 50
# How long a stopped sync tries to take its claim back (see _claim_once): two small
# requests to a store that answers; short, for a store that stopped answering (the
# sync's budget ran out on the claim), which would not answer these either.
_CLAIM_WAIT_S = 0.5


# How far this machine's clock may run ahead of the store's before uploads are named
# by the store's time (see CloudSyncMethod._claim_upload_id).
_CLOCK_AHEAD = timedelta(minutes=10)
# A sync commits only while a prune would still count it as in flight, with this margin.
_COMMIT_MARGIN = timedelta(minutes=15)


def _no_progress(phase: str, done: int, total: int) -> None:
    return None




def cloud_target_id(config: AkoshaSyncConfig) -> str:
    """The key of this target's local state and of its records' delivery channel: the
    store (its endpoint in one spelling, without credentials), bucket and system id.
    Writing ``http://host:9000/`` for ``http://host:9000`` names the same target."""
    return target_id(
        "cloud", endpoint_identity(config.cloud_endpoint), config.cloud_bucket,
        config.system_id_resolved,
    )


def _spelled_target_id(config: AkoshaSyncConfig) -> str:
    """The key used before endpoints were normalized: the endpoint exactly as written."""
    return target_id(
        "cloud", config.cloud_endpoint, config.cloud_bucket, config.system_id_resolved
    )


def load_cloud_state(config: AkoshaSyncConfig) -> TargetState | None:
    """This target's state, or (until the next sync moves it) the one an earlier
    version kept under the endpoint as written. Reads only."""
    tid = cloud_target_id(config)
    state = load_state(config.state_path, tid)
    if state is None and (spelled := _spelled_target_id(config)) != tid:
        state = load_state(config.state_path, spelled)
    return state


def _adopt_spelled_state(config: AkoshaSyncConfig, progress_db: Path) -> TargetState | None:
    """Move a state kept under the endpoint as written (an earlier version's key) to
    its key now, with what its channel delivered: otherwise every record would be
    sent again, to a store that has them. Under the sync lock; the old state goes
    last, so an interruption is finished by the next sync."""
    tid, spelled = cloud_target_id(config), _spelled_target_id(config)
    if spelled == tid or (state := load_state(config.state_path, spelled)) is None:
        return None
    with records.PROGRESS_LOCK:
        moved = records.move_channel(progress_db, spelled, tid)
    state = msgspec.structs.replace(state, target=tid)
    save_state(config.state_path, tid, state)
    remove_state(config.state_path, spelled)
    log.info("state of this target moved to its normalized endpoint's key",
             records=moved)
    return state


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
        self._upload: Upload | None = None  # the sync in progress, for its error message
        # What a running prune condemned (repository.prune) and what verify found
        # damaged (repository.damaged): reused by no upload.
        self.condemned: frozenset[str] = frozenset()

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
        Keywords: ``progress``, a ``(phase, done, total)`` callback; ``deadline``, this
        attempt's share of the sync's budget (default: ``upload_timeout_seconds``).
        """
        progress: ProgressCallback = kwargs.get("progress") or _no_progress
        deadline: Deadline = kwargs.get("deadline") or Deadline.for_config(self.config)
        started = time.monotonic()
        self._upload = None
        try:
            with anyio.fail_after(deadline.remaining()):
                result = await self._sync(upload_reflections, upload_knowledge_graph, progress)
        except TimeoutError as exc:
            outcome = (
                "the manifest may have been written, so nothing of the upload was deleted"
                if self._upload is not None and self._upload.commit_attempted
                else "nothing was committed"
            )
            raise CloudUploadError(
                f"cloud sync did not finish within its {deadline.seconds:.0f}s share of the "
                f"sync's budget (upload_timeout_seconds={self.config.upload_timeout_seconds}"
                f"s); {outcome}. Raise the timeout for large databases or slow links.",
                original=exc,
            ) from exc
        result.duration_seconds = round(time.monotonic() - started, 3)
        return result.to_dict()

    # ------------------------------------------------------------ the work
    async def _sync(
        self, reflections: bool, knowledge_graph: bool, progress: ProgressCallback
    ) -> SyncResult:
        config = self.config
        state = load_state(config.state_path, self.target_id)
        if state is None:
            state = await anyio.to_thread.run_sync(
                _adopt_spelled_state, config, self._progress_db
            )
        self._name_after(state.last_upload_id if state else None)
        upload = self._upload = await self._claim_upload_id()
        log.info("sync started", method="cloud", upload_id=upload.upload_id)

        async def sweep() -> None:
            with anyio.move_on_after(5):  # best effort: what failed syncs left in the store
                await multipart.sweep(config, upload.upload_id)

        # Beside the upload, not before it (~40 ms on a first sync, and hourly): it only
        # aborts multipart uploads of older upload folders, never this one's.
        async with _alongside(sweep):
            return await self._sync_claimed(upload, state, reflections, knowledge_graph,
                                            progress)

    async def _sync_claimed(
        self, upload: Upload, state: TargetState | None, reflections: bool,
        knowledge_graph: bool, progress: ProgressCallback,
    ) -> SyncResult:
        config = self.config
        sid = config.system_id_resolved
        tid = self.target_id
        snapshot_dir = config.state_path / "snapshots" / upload.upload_id
        try:
            # Prune's protocol (repository.prune): after the claim, read what a running
            # prune condemned, and reuse none of it.
            self.condemned = await with_retries(
                lambda: read_condemned(self.store, sid), config=config,
                what="reading the prune plan",
            ) | await with_retries(  # and what verify found damaged: stored again instead
                lambda: read_damaged(self.store, sid), config=config,
                what="reading the list of damaged objects",
            )
            if state is None and config.enable_deduplication:
                state = await self._remote_reference(sid, tid)
            chosen = list(zip(
                config.database_paths.items(), (reflections, knowledge_graph), strict=True
            ))
            wanted = [(name, path) for (name, path), keep in chosen if keep]
            upload.not_selected = [name for (name, _), keep in chosen if not keep]
            blocks = config.storage_layout == LAYOUT_BLOCKS
            try:
                async with contextlib.AsyncExitStack() as stack:
                    memories = None
                    if config.export_memories:
                        memories = await stack.enter_async_context(
                            self._memories_upload(upload, tid, progress)
                        )
                    if blocks:
                        await sync_blocks(
                            self, upload, state, wanted, snapshot_dir, progress, memories
                        )
                    else:
                        await self._sync_files(upload, state, wanted, snapshot_dir, progress)
                        if memories is not None:
                            for name, snap in list(upload.snapshots.items()):
                                if kinds := self._kinds_of(name):
                                    await memories.add(Path(snap.path), kinds)
                    if not set(upload.files) - set(upload.carried_over):
                        raise _NothingToUpload(upload)  # nothing read: no new upload
                    conversations, new_conversations = await self._finish_memories(
                        upload, memories
                    )
            except ExceptionGroup as group:
                # One failed upload cancels the others; report the failure, not the group.
                raise _first_failure(group) from None
            # The last read of the sources is done: let a writer in before the commit.
            await _release_sources(upload)
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
                    "carried_over": upload.carried_over,
                    "not_selected": upload.not_selected,
                    "new_conversation_count": new_conversations,
                    "memories": {k: len(v) for k, v in upload.exported.items()},
                    "undeliverable": dict(upload.undeliverable),
                },
                storage_layout=LAYOUT_BLOCKS if blocks else LAYOUT_FILES,
                index=upload.index_key,
                bytes_new=upload.bytes_new if blocks else upload.bytes_sent,
            )
            key = manifest_key(sid, upload.upload_id)
            progress("manifest", 0, 0)
            body = encode_manifest(manifest)
            if not blocks:
                await check_reused(self, upload)
            await self._still_ours(upload)
            upload.commit_attempted = True
            await commit_manifest(self.store, key, body, config=config)
            upload.bytes_sent += len(body)
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
            # Shielded: a cancelled sync must not leave full copies of the databases.
            with anyio.CancelScope(shield=True):
                # Only after the last read and the export may a writer open the
                # databases again (see repository/source.py).
                await _release_sources(upload)
                await anyio.to_thread.run_sync(remove_snapshot_dir, snapshot_dir)

        # In a worker thread: it may wait for PROGRESS_LOCK, which another sync of this
        # process holds while its export waits for its upload, on this event loop.
        await anyio.to_thread.run_sync(self._commit_state, state, tid, sid, upload, key)
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
            error="; ".join(upload.errors + [
                f"{name} in this upload is the version upload {origin} stored"
                for name, origin in upload.carried_over.items()
                if name in config.database_paths and name not in upload.not_selected
            ]) or None,
            files_unchanged=upload.unchanged,
            files_missing=upload.missing,
            bytes_stored=manifest.total_size_bytes,
            manifest_key=key,
            conversation_count=manifest.conversation_count,
            new_conversation_count=new_conversations,
            details={**self._details(upload), "snapshots": upload.how_read}
            if upload.how_read
            else self._details(upload),
        )

    async def _still_ours(self, upload: Upload) -> None:
        """Right before the commit: a prune (on any machine) takes an upload in flight
        for longer than IN_FLIGHT_STALE for abandoned, and deletes its claim and what it
        stored. A sync that ran that long (the monotonic budget stops while the machine
        sleeps) or whose claim is gone commits nothing: its manifest could name deleted
        packs."""
        ran = time.time() - upload.claimed_wall
        if ran > (IN_FLIGHT_STALE - _COMMIT_MARGIN).total_seconds():
            raise CloudUploadError(
                f"this sync has been running for {ran / 60:.0f} minutes (was the machine "
                "asleep?): a prune may have taken it for abandoned and deleted what it "
                f"stored ({in_flight_rule()}). Nothing was committed; sync again."
            )
        key = claim_key(self.config.system_id_resolved, upload.upload_id)

        async def head() -> bool:
            try:
                await obstore.head_async(self.store, key)
            except FileNotFoundError:
                return False
            return True

        if not await with_retries(head, config=self.config, what=f"checking {key}"):
            raise CloudUploadError(
                f"{key} is gone: a prune took this upload for abandoned and may have "
                "deleted what it stored. Nothing was committed; sync again."
            )

    def _name_after(self, last: str | None) -> None:
        """Name this upload after ``last`` (this machine's last upload) even when the
        clock now says earlier: retention and ``restore latest`` go by the ids, and a
        clock set back (NTP correcting one that ran ahead, within _CLOCK_AHEAD) would
        make the new upload look older than the last, and be forgotten first."""
        when = upload_id_time(last) if last else None
        if when is None or self._clock() > when:
            return
        behind = when + timedelta(seconds=1) - self._clock()
        log.warning(
            "this machine's clock is behind the time of its last upload (was it set "
            "back?); the upload is named after that one",
            last_upload_id=last, behind_seconds=round(behind.total_seconds()),
        )
        self._shift_clock(behind)

    def _shift_clock(self, by: timedelta) -> None:
        """Name uploads (and date manifests) ``by`` later than the clock says."""
        clock = self._clock
        self._clock = lambda: clock() + by

    async def _claim_upload_id(self) -> Upload:
        """Reserve a fresh upload id; the first contact with the store, so it fails fast.

        Upload ids are times, and retention keeps the newest: a machine clock ahead of
        the store's would make an upload the "newest" for as long, and every real one
        made meanwhile could be forgotten. So the claim's time in the store is read
        back; beyond _CLOCK_AHEAD this sync names its upload by the store's clock."""
        upload = await self._claim_once()
        key = claim_key(self.config.system_id_resolved, upload.upload_id)
        try:
            stored = await with_retries(lambda: obstore.head_async(self.store, key),
                                        config=self.config, what=f"checking {key}")
        except BaseException:
            await self._discard(upload)  # stopped or failed here: take the claim back
            raise
        ahead = self._clock() - stored["last_modified"]
        if ahead <= _CLOCK_AHEAD:
            # From here on _sync_claimed removes the claim if the sync fails or is
            # stopped; nothing in between is a checkpoint where a cancel could land.
            return upload
        log.warning(
            "this machine's clock is ahead of the object store's; the upload is named by "
            "the store's time. Set the clock right (NTP).",
            ahead_seconds=round(ahead.total_seconds()), upload_id=upload.upload_id,
        )
        await with_retries(lambda: obstore.delete_async(self.store, key),
                           config=self.config, what=f"removing {key}")
        self._shift_clock(-ahead)
        return await self._claim_once()

    async def _claim_once(self) -> Upload:
        sid = self.config.system_id_resolved
        for attempt in range(_MAX_ID_ATTEMPTS):
            upload_id = self._generate_upload_id(attempt)
            key = claim_key(sid, upload_id)
            body = msgspec.json.encode(
                {"upload_id": upload_id, "host": socket.gethostname(), "claimed_at": str(
                    self._clock().isoformat()), "nonce": secrets.token_hex(8)}
            )

            async def put(key: str = key, body: bytes = body) -> bool:
                # An answer lost on the way: the retry finds the key taken, by our bytes.
                return await create_once(self.store, key, body)

            try:
                claimed = await with_retries(
                    put, config=self.config, what="reserving an upload id",
                    connect_attempts=2,
                )
            except BaseException:
                # A claim left in the store holds every prune up for hours (an upload
                # in flight), and a PUT stopped or failed on our side may have landed.
                await self._take_back_claim(key, body)
                raise
            if claimed:
                upload = Upload(upload_id)
                upload.written.append(key)
                upload.bytes_sent += len(body)
                return upload
        raise CloudUploadError(
            f"could not reserve an upload id after {_MAX_ID_ATTEMPTS} attempts; "
            "is another machine using the same system_id?"
        )

    async def _take_back_claim(self, key: str, body: bytes) -> None:
        """Best effort: delete the claim at ``key`` if it holds our ``body``."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CLAIM_WAIT_S):
            try:
                stored = await (await obstore.get_async(self.store, key)).bytes_async()
                if bytes(stored) == body:
                    await obstore.delete_async(self.store, key)
            except Exception as exc:  # absent, or the store is what failed
                log.debug("claim not taken back", key=key, error=str(exc)[:200])

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

    def _records_exported(self, state: TargetState | None, name: str) -> bool:
        """False when this database holds record kinds never exported to this target
        (an upgrade added them): it must be read even though it did not change."""
        if not self.config.export_memories or state is None:
            return True
        return set(self._kinds_of(name)) <= set(state.exported_kinds)

    def _kinds_of(self, name: str) -> tuple[str, ...]:
        if name == self.config.reflection_db:
            return records.REFLECTION_KINDS
        if name == self.config.knowledge_graph_db:
            return records.GRAPH_KINDS
        return ()

    async def _upload_file(
        self,
        path: Path,
        key: str,
        upload: Upload,
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
        part = part_size(self.config)

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

    async def _sync_files(
        self,
        upload: Upload,
        state: TargetState | None,
        wanted: list[tuple[str, Path]],
        snapshot_dir: Path,
        progress: ProgressCallback,
    ) -> None:
        """The files layout: a database's uploads start as soon as its snapshot is
        taken, so the next snapshot's copying overlaps them."""
        async with anyio.create_task_group() as tg:
            for name, path in wanted:
                for item in await sync_database(
                    self, upload, state, name, path, snapshot_dir, progress
                ):
                    tg.start_soon(send, self, upload, item, progress)
        for name in upload.not_selected:
            await carry_over(self, upload, state, name)

    def _memories_upload(
        self, upload: Upload, tid: str, progress: ProgressCallback
    ) -> MemoriesUpload:
        return MemoriesUpload(
            self.store, self.config,
            memories_key(self.config.system_id_resolved, upload.upload_id),
            progress_db=self._progress_db, channel=tid, progress=progress,
            written=upload.written,
        )

    async def _finish_memories(
        self, upload: Upload, memories: MemoriesUpload | None
    ) -> tuple[int, int | None]:
        """Complete memories.json; return the snapshot's conversations and the new ones.

        The count is the reflection database's total (WAL rows included), also when
        it was unchanged and reused; new ones are those written to memories.json.
        """
        name = self.config.reflection_db
        snap = upload.snapshots.get(name)
        entry = upload.files.get(name)
        total = snap.conversation_count if snap else (entry.conversation_count or 0) if entry else 0
        if memories is None:
            return total, None
        stored = await memories.finish()
        assert memories.export is not None
        upload.exported = memories.export.written
        upload.undeliverable = memories.export.undeliverable
        new = len(upload.exported.get("conversation", []))
        upload.files[MEMORIES_NAME] = msgspec.structs.replace(stored, conversation_count=new)
        upload.bytes_sent += stored.stored_size
        upload.bytes_new += stored.stored_size
        upload.uploaded_keys.append(memories.key)
        return total, new

    @staticmethod
    def _details(upload: Upload) -> dict[str, Any]:
        """Per kind: records written to memories.json and those skipped (no embedding)."""
        return {
            "memories": {kind: len(ids) for kind, ids in upload.exported.items()},
            "skipped": {
                "no_embedding": {
                    "count": sum(upload.undeliverable.values()),
                    "by_kind": dict(upload.undeliverable),
                    "reason": records.NO_EMBEDDING_REASON,
                }
            },
        }

    @property
    def _progress_db(self) -> Path:
        return self.config.state_path / "delivered.duckdb"

    def _commit_state(
        self, state: TargetState | None, tid: str, sid: str, upload: Upload, key: str
    ) -> None:
        """After the manifest: remember what is stored and which rows were exported."""
        files = dict(state.files) if state else {}
        files.update(upload.new_state)
        for name, stored in upload.new_state.items():
            # A database stored without a WAL: forget the WAL of its older version.
            if name in self.config.database_paths and stored.entry.wal is None:
                files.pop(name + ".wal", None)
        kinds = set(state.exported_kinds) if state else set()
        read = [*upload.snapshots, *upload.how_read]  # copies, and blocks sources
        read_kinds = {kind for name in read for kind in self._kinds_of(name)}
        if self.config.export_memories:
            kinds |= read_kinds
        else:
            # Read and not exported: its new fingerprint must not let a later sync with
            # the export on skip it, or the records added meanwhile never reach Akosha.
            kinds -= read_kinds
        save_state(
            self.config.state_path,
            tid,
            TargetState(
                target=tid,
                system_id=sid,
                last_upload_id=upload.upload_id,
                last_manifest_key=key,
                files=files,
                exported_kinds=sorted(kinds),
            ),
        )
        clear_restored(self.config)  # this upload holds what a restore put on disk
        if (upload.snapshots or upload.how_read) and self.config.export_memories:
            records.save_undeliverable(self.config.state_path, "cloud", upload.undeliverable)
        if any(upload.exported.values()):
            import duckdb

            with records.PROGRESS_LOCK:
                con = duckdb.connect()
                try:
                    records.open_progress(con, self._progress_db)
                    for kind, ids in upload.exported.items():
                        records.mark_delivered(con, tid, kind, ids)
                finally:
                    con.close()

    async def _discard(self, upload: Upload) -> None:
        """Best effort: remove what a failed sync wrote, unless it may be committed."""
        if upload.commit_attempted:
            log.warning(
                "the manifest may have been written; nothing of the upload is deleted",
                upload_id=upload.upload_id,
            )
            return
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await multipart.abort_upload(self.config, upload.upload_id)
            for key in reversed(upload.written):
                try:
                    await obstore.delete_async(self.store, key)
                except Exception as exc:  # the store may be the very thing that failed
                    log.debug("cleanup failed", key=key, error=str(exc)[:200])
                    return


async def _release_sources(upload: Upload) -> None:
    for source in upload.sources.values():
        await anyio.to_thread.run_sync(source.close)
    upload.sources.clear()


@contextlib.asynccontextmanager
async def _alongside(task: Callable[[], Coroutine[Any, Any, None]]) -> AsyncIterator[None]:
    """Run ``task`` (which never raises) while the block runs; the block's own exception
    comes out as itself, not wrapped in the task group's ExceptionGroup."""
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(task)
            yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


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
    def __init__(self, upload: Upload) -> None:
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
