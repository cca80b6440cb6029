"""Restore an upload's databases from the bucket: find, plan (pure), execute.

* :func:`find_upload` picks the upload (``latest``, an id, or the newest at or before
  a time) and reads its manifest and, for the blocks layout, its index.
* :func:`inspect_target` looks at the target folder: which files exist, which a
  running process holds open (DuckDB's lock).
* :func:`plan_restore` is pure: from those two it says what would be fetched and
  written, or why not (an existing database without ``force``, a locked one always).
* :func:`execute` fetches whole packs (or whole objects, files layout) a few at a
  time, checks every piece's length, writes it at its offsets into a temporary file
  beside the target while hashing the whole file in order, fsyncs, checks every
  whole file's size and SHA-256 (when one does not match, every piece of it is
  hashed to name the damaged pack), and only then keeps any existing database as
  ``NAME.bak-<time>`` and renames the new files into place
  (:mod:`~akosha_sync.repository.placement`: the target is checked again first, and
  no signal or crash leaves a database beside a WAL not its own). Any failure before
  that leaves the target exactly as it was. File names from the bucket must be plain
  names (never a path). The whole-file hash covers every byte
  of every piece, so a piece cannot be wrong and the file right.

Reads the blocks layout, the files layout and uploads made before either existed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import obstore

from akosha_sync._output import human_size
from akosha_sync.config import AkoshaSyncConfig, system_id_problem
from akosha_sync.errors import CloudUploadError
from akosha_sync.repository.format import (
    LAYOUT_BLOCKS,
    LAYOUT_FILES,
    Index,
    Piece,
    decode_index,
    index_mismatches,
)
from akosha_sync.repository.manifest import (
    MEMORIES_NAME,
    Manifest,
    carried_over_from,
    decode_manifest,
    manifest_key,
    upload_id_order,
    upload_id_problem,
    upload_id_time,
    uploads_prefix,
)
from akosha_sync.repository.packs import PieceError, extract_piece
from akosha_sync.repository.pieces import piece_id, pread_all
from akosha_sync.repository.placement import Placement, PlacementError, locked_by_other, place
from akosha_sync.repository.restored import note_restored
from akosha_sync.repository.snapshots import list_system_ids
from akosha_sync.repository.store import FAILED, Refusal, with_retries

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "Fetch",
    "PlannedFile",
    "RestoreError",
    "RestorePlan",
    "RestoreResult",
    "TargetFile",
    "content_notes",
    "execute",
    "find_upload",
    "inspect_target",
    "plan_restore",
    "prepare_restore",
    "restore",
    "target_folder_problem",
    "upload_time",
]

ProgressCallback = Callable[[str, int, int], None]
# Packs in flight: 4 x 8 MiB keeps a 250 MB restore well under 150 MB of memory.
_FETCH_CONCURRENCY = 4
# Other systems named when this one has no upload (the new-laptop case).
_SYSTEMS_SHOWN = 8
_READ = 1024 * 1024
# Bytes written to a file between two fdatasync calls during a restore.
_FLUSH_EVERY = 32 * 1024 * 1024


class RestoreError(Refusal):
    """The restore cannot be done; the message names the object or file and why."""


class TargetFile(msgspec.Struct, frozen=True):
    """What :func:`inspect_target` found at one name in the target folder."""

    exists: bool
    locked_by_other: bool = False


class PlannedFile(msgspec.Struct, frozen=True):
    name: str
    path: str
    size: int
    sha256: str
    replaces: bool  # a file of this name is there and will be kept as ``backup``
    backup: str | None = None


class Fetch(msgspec.Struct, frozen=True):
    key: str
    size: int


class RestorePlan(msgspec.Struct, frozen=True, kw_only=True):
    upload_id: str
    system_id: str
    uploaded_at: str
    storage_layout: str
    target_dir: str
    files: list[PlannedFile]
    # Files in the target that the restore moves aside without replacing them (a WAL
    # of the old database when the upload has none: DuckDB would replay it).
    set_aside: list[PlannedFile]
    fetch: list[Fetch]
    bytes_to_download: int
    problems: list[str]
    # What the user should know of this upload's content (a database it lacks, or
    # holds at an older version); not problems: the restore goes ahead.
    notes: list[str] = msgspec.field(default_factory=list)


class RestoreResult(msgspec.Struct, kw_only=True):
    upload_id: str
    system_id: str
    storage_layout: str
    target_dir: str
    files: list[PlannedFile]
    bytes_downloaded: int
    duration_seconds: float
    dry_run: bool = False
    bytes_to_download: int = 0
    fetch: list[Fetch] = msgspec.field(default_factory=list)
    problems: list[str] = msgspec.field(default_factory=list)  # dry run: why it would fail
    notes: list[str] = msgspec.field(default_factory=list)  # see RestorePlan.notes
    set_aside: list[PlannedFile] = msgspec.field(default_factory=list)  # see RestorePlan


# ------------------------------------------------------------------- finding
def upload_time(upload_id: str) -> datetime | None:
    """The UTC time an upload id names (``YYYYMMDD_HHMMSS_...``), None if it names none."""
    return upload_id_time(upload_id)


async def _get(store: ObjectStore, config: AkoshaSyncConfig, key: str) -> bytes | None:
    async def get() -> bytes | None:
        try:
            return bytes(await (await obstore.get_async(store, key)).bytes_async())
        except FileNotFoundError:
            return None

    return await with_retries(get, config=config, what=f"reading {key}")


async def find_upload(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    *,
    system_id: str,
    upload_id: str | None = None,
    at: datetime | None = None,
) -> tuple[Manifest, Index | None]:
    """The chosen upload's manifest and (blocks layout) index.

    ``upload_id`` None or ``"latest"``: the newest committed upload, at or before
    ``at`` when given.
    """
    if upload_id and upload_id != "latest":
        if problem := upload_id_problem(upload_id):
            raise RestoreError(problem)
        if at is not None:  # one would be silently ignored
            raise RestoreError(
                f"both an upload id ({upload_id}) and a time ({_when(at)}) were given; give "
                "one: the id restores that upload, the time the newest at or before it."
            )
        candidates = [upload_id]
    else:

        async def listing() -> list[str]:
            found = await obstore.list_with_delimiter_async(
                store, prefix=uploads_prefix(system_id)
            )
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]

        ids = await with_retries(listing, config=config, what="listing the uploads")
        if not ids:
            raise RestoreError(await _no_upload_of(store, config, system_id))
        every = ids
        if at is not None:
            cutoff = at.astimezone(UTC)
            ids = [i for i in ids if (t := upload_time(i)) is not None and t <= cutoff]
        candidates = sorted(ids, key=upload_id_order, reverse=True)
        if at is not None and not candidates:
            oldest = min(every, key=upload_id_order)
            raise RestoreError(
                f"no upload of system {system_id!r} at or before {_when(at)} in the "
                f"bucket; its oldest is {oldest}. Pick a later --at, or see them all with "
                f"`akosha-sync snapshots --system {system_id}`."
            )
    for uid in candidates:
        key = manifest_key(system_id, uid)
        data = await _get(store, config, key)
        if data is None:
            continue  # an interrupted sync: no manifest, not an upload
        try:
            manifest = decode_manifest(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise RestoreError(f"{key} is damaged ({exc}); pick another upload id.") from exc
        index: Index | None = None
        if manifest.storage_layout == LAYOUT_BLOCKS:
            if not manifest.index:
                raise RestoreError(f"{key} has the blocks layout but names no index.")
            raw = await _get(store, config, manifest.index)
            if raw is None:
                raise RestoreError(
                    f"the index {manifest.index} of upload {uid} is missing from the bucket; "
                    "this upload cannot be restored, pick an earlier one."
                )
            try:
                index = decode_index(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise RestoreError(f"the index {manifest.index} is damaged: {exc}") from exc
        return manifest, index
    if upload_id and upload_id != "latest":
        named = upload_id[16:].rsplit(".", 1)[0] if upload_time(upload_id) else ""
        elsewhere = (f" Its id names system {named!r}: restore it with --system {named}."
                     if named and named != system_id else "")
        raise RestoreError(
            f"upload {upload_id} of system {system_id!r} has no manifest in the bucket "
            "(it does not exist or never finished); `akosha-sync snapshots --system "
            f"{system_id}` lists the ones that can be restored.{elsewhere}"
        )
    raise RestoreError(f"no committed upload of system {system_id!r} in the bucket.")


async def _no_upload_of(store: ObjectStore, config: AkoshaSyncConfig, system_id: str) -> str:
    """Why nothing can be restored for ``system_id``, naming the systems that can be:
    on a new machine the system id (its host name) is not the old one's."""
    listed = await with_retries(
        lambda: list_system_ids(store), config=config, what="listing the systems"
    )
    others = [s for s in listed if s != system_id]
    if not others:
        return (f"no upload of system {system_id!r} in the bucket, and no other system has "
                "any; check cloud_bucket (and cloud_endpoint) in the configuration.")
    shown = ", ".join(others[:_SYSTEMS_SHOWN]) + (", ..." if len(others) > _SYSTEMS_SHOWN else "")
    return (f"no upload of system {system_id!r} in the bucket. Systems in the bucket: {shown}; "
            f"restore one with --system ID (e.g. --system {others[0]}).")


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------- target
# A name restore writes into the target: one plain file name, never a path. Names come
# from the bucket (an index or manifest), which another machine or damage may have
# changed, and the SHA-256 checks cover contents, not names.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}")


def _plain(name: str) -> bool:
    return _PLAIN_NAME.fullmatch(name) is not None


def restore_names(manifest: Manifest, index: Index | None) -> list[str]:
    """The files an upload restores: its databases and WALs (not Akosha's memories)."""
    if index is not None:
        return sorted(index.files)
    return sorted(n for n in manifest.file_details if n != MEMORIES_NAME)


def _wal_names(names: list[str]) -> list[str]:
    return [n + ".wal" for n in names if n.endswith(".duckdb")]


def target_folder_problem(target: Path, needed: int = 0) -> str | None:
    """Why the restore cannot write ``needed`` bytes into ``target`` (created when
    missing), or None: found before anything is downloaded."""
    if target.exists():
        if not target.is_dir():
            return f"{target} is a file, not a folder; restore --to a folder (it is created)."
        if not os.access(target, os.W_OK | os.X_OK):
            return (f"{target} is not writable by this user; restore --to another folder or "
                    "change its permissions.")
        folder = target
    else:
        folder = target.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            return (f"{target} cannot be created: {folder} is not a writable folder; restore "
                    "--to another folder.")
    # Databases being replaced are kept (.bak), so every restored byte needs room.
    stats = os.statvfs(folder)
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        return (f"the restored files need {human_size(needed)} in {folder}, which has "
                f"{human_size(free)} free; free some space or restore --to another folder.")
    return None


def inspect_target(target: Path, names: list[str]) -> dict[str, TargetFile]:
    """Existence and lock state of each name (and each database's WAL) in ``target``."""
    found: dict[str, TargetFile] = {}
    for name in sorted(set(names) | set(_wal_names(names))):
        path = target / name
        exists = os.path.lexists(path)  # a dangling symlink too: never replaced silently
        found[name] = TargetFile(exists=exists, locked_by_other=exists and locked_by_other(path))
    return found


# --------------------------------------------------------------------- plan
def _stamp(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def plan_restore(
    manifest: Manifest,
    index: Index | None,
    *,
    target: Path,
    existing: dict[str, TargetFile],
    force: bool,
    now: datetime,
) -> RestorePlan:
    """What a restore would fetch and write, and the problems that forbid it. Pure."""
    names = restore_names(manifest, index)
    problems: list[str] = [
        f"upload {manifest.upload_id} cannot be restored: {p}; its index is damaged "
        "(`akosha-sync verify` names it). Restore another upload." for p in (
            index_mismatches(manifest, index) if index is not None else [])
    ]
    stamp = _stamp(now)
    files: list[PlannedFile] = []
    fetch: dict[str, int] = {}
    for name in names:
        if not _plain(name):
            problems.append(
                f"upload {manifest.upload_id} names a file {name!r}, which is not a plain "
                f"file name: its {'index' if index is not None else 'manifest'} is damaged "
                "or was not written by akosha-sync; nothing is written for it. Restore "
                "another upload (`akosha-sync snapshots` lists them)."
            )
            continue
        if index is not None:
            entry = index.files[name]
            size, sha = entry.size, entry.sha256
            for piece in entry.pieces:
                ref = index.packs.get(piece.pack_id)
                if ref is None:
                    problems.append(
                        f"the index of {manifest.upload_id} names pack {piece.pack_id} for "
                        f"{name} but does not list it; the index is damaged"
                    )
                    break
                fetch[ref.key] = ref.size
        else:
            detail = manifest.file_details[name]
            size, sha = detail.original_size, detail.sha256
            fetch[detail.key] = detail.stored_size
        here = existing.get(name, TargetFile(exists=False))
        files.append(PlannedFile(
            name=name, path=str(target / name), size=size, sha256=sha, replaces=here.exists,
            backup=str(target / f"{name}.bak-{stamp}") if here.exists and force else None,
        ))
    restored = set(names)
    set_aside = [
        PlannedFile(name=n, path=str(target / n), size=0, sha256="", replaces=True,
                    backup=str(target / f"{n}.bak-{stamp}"))
        for n in _wal_names(names)
        if n not in restored and existing.get(n, TargetFile(exists=False)).exists
    ]
    for name, state in sorted(existing.items()):
        if state.locked_by_other:
            problems.append(
                f"{target / name} is open in a running process (it holds DuckDB's lock: "
                "Session-Buddy or another DuckDB client); close it and try again. "
                "--force does not override this."
            )
    if not force:
        taken = [f.path for f in files if f.replaces] + [f.path for f in set_aside]
        if taken:
            problems.append(
                f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''}; "
                "restore with --force to keep them as NAME.bak-<time> and put the upload "
                "in place, or --to another folder."
            )
    return RestorePlan(
        upload_id=manifest.upload_id,
        system_id=manifest.system_id,
        uploaded_at=manifest.uploaded_at,
        storage_layout=LAYOUT_BLOCKS if index is not None else LAYOUT_FILES,
        target_dir=str(target),
        files=files,
        set_aside=set_aside,
        fetch=[Fetch(k, s) for k, s in fetch.items()],
        bytes_to_download=sum(fetch.values()),
        problems=problems,
        notes=content_notes(manifest, names),
    )


def content_notes(manifest: Manifest, names: list[str]) -> list[str]:
    """What this upload lacks or holds from an earlier one, from its metadata. Pure.

    A sync that could not read a database still commits the others; it keeps the
    unreadable one at the version an earlier upload stored (``carried_over``), or,
    with none to keep, leaves it out (``failed_databases``, ``missing_databases``).
    A database the sync was not asked for (``not_selected``) is kept the same way.
    """
    uid = manifest.upload_id
    carried = carried_over_from(manifest)
    left_out = manifest.metadata.get("not_selected")
    left_out = [str(n) for n in left_out] if isinstance(left_out, list) else []
    notes = [
        f"{name} is the version upload {origin} stored: "
        + (f"the sync that made {uid} was not asked for it" if name in left_out
           else f"it could not be read when {uid} was made")
        for name, origin in carried.items() if not name.endswith(".wal")
    ]
    notes += [
        f"{name} is not in {uid}: the sync that made it was not asked for it and no "
        "earlier upload held it"
        for name in left_out if name not in carried and name not in names
    ]
    failed = manifest.metadata.get("failed_databases")
    for error in failed if isinstance(failed, list) else []:
        if not any(name in str(error) for name in carried):
            notes.append(f"a database could not be read when {uid} was made and is not in "
                         f"it: {error}; an earlier upload may hold it (akosha-sync snapshots)")
    missing = manifest.metadata.get("missing_databases")
    for name in missing if isinstance(missing, list) else []:
        if str(name) not in names:
            notes.append(f"{name} is not in {uid}: it was not in the data folder when the "
                         "upload was made; an earlier upload may hold it (akosha-sync "
                         "snapshots)")
    return notes


# ------------------------------------------------------------------ execute
def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.restore-{os.getpid()}.tmp")


def _remove_stale_temps(target: Path, names: list[str]) -> None:
    """Delete the temporary files of restores that died (kill -9, a power cut): a
    database's worth of disk each. A temp of a process that still runs is its own."""
    for name in names:
        for temp in target.glob(f".{name}.restore-*.tmp"):
            pid = temp.name[len(f".{name}.restore-"):-len(".tmp")]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                os.kill(int(pid), 0)
                continue  # alive (or not ours to signal: EPERM): leave it
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            with contextlib.suppress(OSError):
                temp.unlink()


class _Progress:
    def __init__(self, progress: ProgressCallback, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n
        self.progress("restore:download", self.done, self.total)


async def _fetch_bytes(store: ObjectStore, config: AkoshaSyncConfig, key: str) -> Any:
    async def get() -> Any:
        try:
            return await (await obstore.get_async(store, key)).bytes_async()
        except FileNotFoundError:
            return None

    data = await with_retries(get, config=config, what=f"reading {key}")
    if data is None:
        raise RestoreError(
            f"{key} is missing from the bucket; this upload cannot be restored "
            "(pick an earlier one with --at or an upload id). Nothing was changed."
        )
    return data


class _WholeFile:
    """One restored file: its descriptor and its whole-file SHA-256, taken in order.

    Pieces arrive pack by pack, mostly in file order. A piece that lands where the
    hash has reached is hashed from memory; one that lands ahead is only noted, and
    read back (from the page cache) when the gap before it closes. So the whole file
    is hashed once, while the download goes on, rather than read again at the end.

    That hash covers every byte of every piece, so pieces are not hashed one by one
    as well (a second pass over 250 MB, ~0.4 s of a restore). When it does not match,
    :meth:`check` hashes the pieces from the written file to name the damaged pack.
    """

    def __init__(
        self, fd: int, planned: PlannedFile, pieces: list[tuple[Piece, int, str]]
    ) -> None:
        self.fd = fd
        self.planned = planned
        self.pieces = pieces  # (piece, offset in the file, key of its pack)
        self.sha = hashlib.sha256()
        self.hashed = 0  # bytes from the start already in ``sha``
        self._ahead: dict[int, int] = {}  # offset -> length, written but not hashed
        self._lock = threading.Lock()
        self._unsynced = 0

    def write(self, data: bytes | memoryview, offset: int) -> None:
        os.pwrite(self.fd, data, offset)
        with self._lock:
            if offset != self.hashed:
                self._ahead[offset] = len(data)
            else:
                self.sha.update(data)
                self.hashed += len(data)
                while (length := self._ahead.pop(self.hashed, None)) is not None:
                    self.sha.update(_pread_exact(self.fd, length, self.hashed))
                    self.hashed += length
            self._unsynced += len(data)
            flush = self._unsynced >= _FLUSH_EVERY
            if flush:
                self._unsynced = 0
        if flush:
            # Start the disk writes now: the final fsync then has little left to wait for.
            os.fdatasync(self.fd)

    def check(self) -> None:
        """Raise unless the file was written whole and hashes to the upload's SHA-256."""
        if self.hashed == self.planned.size and self.sha.hexdigest() == self.planned.sha256:
            return
        for piece, offset, key in self.pieces:
            data = _pread_exact(self.fd, piece.length, offset)
            if piece_id(data) != piece.sha256:
                raise RestoreError(
                    f"piece {piece.sha256[:16]} of {self.planned.name} in {key} does not "
                    "match its SHA-256: the pack is damaged. This upload cannot be "
                    "restored (pick an earlier one with --at or an upload id). "
                    "Nothing was changed."
                )
        raise RestoreError(
            f"{self.planned.name} as restored ({self.hashed} bytes) does not match the "
            f"upload's size {self.planned.size} and SHA-256, though each of its pieces "
            "does: the upload's index is damaged. Nothing was changed."
        )


def _placed(index: Index, name: str) -> list[tuple[Piece, int, str]]:
    """The pieces of one file with their offsets and the keys of their packs."""
    placed: list[tuple[Piece, int, str]] = []
    offset = 0
    for piece in index.files[name].pieces:
        placed.append((piece, offset, index.packs[piece.pack_id].key))
        offset += piece.length
    return placed


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = pread_all(fd, length, offset)
    if len(data) != length:
        raise OSError(f"short read at {offset} of a file being restored")
    return data


async def _restore_blocks(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    plan: RestorePlan,
    index: Index,
    files: dict[str, _WholeFile],
    meter: _Progress,
) -> int:
    # pack id -> [(piece, file name, offset in the file)]
    wanted: dict[str, list[tuple[Piece, str, int]]] = {}
    for planned in plan.files:
        for piece, offset, _ in files[planned.name].pieces:
            wanted.setdefault(piece.pack_id, []).append((piece, planned.name, offset))
    downloaded = 0
    limiter = anyio.CapacityLimiter(_FETCH_CONCURRENCY)

    async def one(pack_id: str, uses: list[tuple[Piece, str, int]]) -> None:
        nonlocal downloaded
        ref = index.packs[pack_id]
        async with limiter:
            data = await _fetch_bytes(store, config, ref.key)
            view = memoryview(data)
            downloaded += len(view)

            def write() -> None:
                # Pieces used at several places are decompressed once; only those kept.
                left = Counter(piece.sha256 for piece, _, _ in uses)
                cache: dict[str, bytes | memoryview] = {}
                for piece, name, offset in uses:
                    raw = cache.get(piece.sha256)
                    if raw is None:
                        try:
                            raw = extract_piece(view, piece, where=ref.key, check=False)
                        except PieceError as exc:
                            raise RestoreError(f"{exc}. Nothing was changed.") from exc
                    files[name].write(raw, offset)
                    left[piece.sha256] -= 1
                    if left[piece.sha256]:
                        cache[piece.sha256] = raw
                    else:
                        cache.pop(piece.sha256, None)

            await anyio.to_thread.run_sync(write)
            meter.add(len(view))

    async with anyio.create_task_group() as tg:
        for pack_id in _fetch_order(wanted):
            tg.start_soon(one, pack_id, wanted[pack_id])
    return downloaded


def _fetch_order(wanted: dict[str, list[tuple[Piece, str, int]]]) -> list[str]:
    """Packs in file order, the files taken in turn.

    In file order, so each whole-file hash mostly follows from memory; in turn, so the
    files' hashes advance side by side on two cores rather than one after the other.
    """
    by_file: dict[str, list[str]] = {}
    for pack_id, uses in wanted.items():  # a pack goes with the first file using it
        by_file.setdefault(uses[0][1], []).append(pack_id)
    queues = list(by_file.values())
    order: list[str] = []
    for turn in range(max((len(q) for q in queues), default=0)):
        order.extend(q[turn] for q in queues if turn < len(q))
    return order


async def _restore_object(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    manifest: Manifest,
    name: str,
    fd: int,
    meter: _Progress,
) -> int:
    detail = manifest.file_details[name]

    async def attempt() -> int | str:
        """Bytes read, or why the object cannot be used (not retried)."""
        os.ftruncate(fd, 0)
        try:
            result = await obstore.get_async(store, detail.key)
        except FileNotFoundError:
            return "is missing from the bucket"
        stored = hashlib.sha256()
        count = 0
        position = 0
        decompress: Any = None
        if detail.compression:
            import zstandard

            decompress = zstandard.ZstdDecompressor().decompressobj()
        async for chunk in result.stream(min_chunk_size=_READ):
            stored.update(chunk)
            count += len(chunk)
            try:
                out = decompress.decompress(bytes(chunk)) if decompress else bytes(chunk)
            except Exception:  # zstandard.ZstdError: damaged frame
                return "does not decompress: the object is damaged"
            try:
                os.pwrite(fd, out, position)
            except OSError as exc:  # the disk, not the store: not retried
                raise _DiskError(exc) from exc
            position += len(out)
            meter.add(len(chunk))
        if count != detail.stored_size or stored.hexdigest() != detail.stored_sha256:
            return "does not match its SHA-256 or size in the manifest: the object is damaged"
        return count

    try:
        outcome = await with_retries(attempt, config=config, what=f"reading {detail.key}")
    except CloudUploadError as exc:
        raise RestoreError(str(exc).replace(FAILED, "restore failed")) from exc
    if isinstance(outcome, str):
        raise RestoreError(
            f"{detail.key} {outcome}; this upload cannot be restored. Nothing was changed."
        )
    return outcome


def _check_whole(path: Path, planned: PlannedFile) -> None:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_READ * 4):
            digest.update(chunk)
            size += len(chunk)
    if size != planned.size or digest.hexdigest() != planned.sha256:
        raise RestoreError(
            f"{planned.name} as restored ({size} bytes) does not match the upload's size "
            f"{planned.size} and SHA-256; the upload is damaged. Nothing was changed."
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def execute(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    plan: RestorePlan,
    manifest: Manifest,
    index: Index | None,
    *,
    progress: ProgressCallback | None = None,
) -> RestoreResult:
    """Carry out a plan without problems; see the module docstring for the order."""
    if plan.problems:
        raise RestoreError("; ".join(plan.problems))
    started = time.monotonic()
    target = Path(plan.target_dir)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RestoreError(f"cannot create {target} ({exc.strerror}); restore --to another "
                           "folder.") from exc
    await anyio.to_thread.run_sync(_remove_stale_temps, target, [f.name for f in plan.files])
    meter = _Progress(progress or (lambda phase, done, total: None), plan.bytes_to_download)
    temps = {f.name: _temp_path(Path(f.path)) for f in plan.files}
    fds: dict[str, int] = {}
    downloaded = 0
    try:
        for planned in plan.files:
            fd = os.open(temps[planned.name], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            fds[planned.name] = fd
            os.ftruncate(fd, planned.size)
        try:
            if index is not None:
                whole = {f.name: _WholeFile(fds[f.name], f, _placed(index, f.name))
                         for f in plan.files}
                downloaded = await _restore_blocks(store, config, plan, index, whole, meter)
            else:
                for planned in plan.files:
                    downloaded += await _restore_object(
                        store, config, manifest, planned.name, fds[planned.name], meter
                    )
        except BaseExceptionGroup as group:
            first = _first(group)
            if isinstance(first, _DiskError) or (isinstance(first, OSError) and _local(first)):
                raise _write_failed(target, first) from first
            raise first from None
        except CloudUploadError as exc:
            raise RestoreError(str(exc).replace(FAILED, "restore failed")) from exc
        except (_DiskError, OSError) as exc:
            if isinstance(exc, OSError) and not _local(exc):
                raise
            raise _write_failed(target, exc) from exc

        def finish() -> None:
            for planned in plan.files:
                if index is not None:
                    whole[planned.name].check()  # hashed while it was written
                fd = fds.pop(planned.name)
                os.fsync(fd)
                os.close(fd)
                if index is None:
                    _check_whole(temps[planned.name], planned)

        try:
            await anyio.to_thread.run_sync(finish)
        except OSError as exc:
            raise _write_failed(target, exc) from exc
        meter.progress("restore:install", 0, 0)
        # Everything is fetched and checked: now, and only now, touch the target.
        kept = _install(plan, temps)
        _fsync_dir(target)
        if index is not None:  # the next sync reuses this upload's pieces (restored.py)
            note_restored(config, system_id=plan.system_id, upload_id=plan.upload_id,
                          manifest_key=manifest_key(plan.system_id, plan.upload_id),
                          target=target)
    finally:
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return RestoreResult(
        upload_id=plan.upload_id,
        system_id=plan.system_id,
        storage_layout=plan.storage_layout,
        target_dir=plan.target_dir,
        files=[msgspec.structs.replace(f, backup=kept[f.name]) if f.name in kept else f
               for f in plan.files],
        bytes_downloaded=downloaded,
        duration_seconds=round(time.monotonic() - started, 3),
        bytes_to_download=plan.bytes_to_download,
        notes=plan.notes,
        set_aside=[msgspec.structs.replace(f, backup=kept.get(f.name, f.backup))
                   for f in plan.set_aside],
    )


def _install(plan: RestorePlan, temps: dict[str, Path]) -> dict[str, str]:
    """Keep what is replaced, then rename the restored files into place
    (:mod:`~akosha_sync.repository.placement`: all or nothing, in an order that never
    leaves a database beside another's WAL). Returns the backups kept, by name."""
    items = [
        Placement(name=f.name, path=Path(f.path), temp=None, replaces=True,
                  backup=Path(f.backup) if f.backup else None)
        for f in plan.set_aside
    ] + [
        Placement(name=f.name, path=Path(f.path), temp=temps[f.name], replaces=f.replaces,
                  backup=Path(f.backup) if f.backup else None)
        for f in plan.files
    ]
    try:
        return place(items)
    except PlacementError as exc:
        raise RestoreError(
            f"putting the restored files in place in {plan.target_dir} failed: {exc}. "
            "Nothing was lost."
        ) from exc


class _DiskError(Refusal):
    """A local write failed inside a retried read of the store (files layout)."""

    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.os_error = exc


def _local(exc: OSError) -> bool:
    """An error of this machine's files, not of the network (also OSErrors)."""
    return not isinstance(exc, ConnectionError | TimeoutError)


def _write_failed(target: Path, error: OSError | _DiskError) -> RestoreError:
    exc = error.os_error if isinstance(error, _DiskError) else error
    fix = ("Free some space there, or restore --to another folder." if exc.errno == errno.ENOSPC
           else "Restore --to another folder.")
    return RestoreError(
        f"writing the restored files into {target} failed ({exc.strerror or exc}); nothing "
        f"in it was replaced. {fix}"
    )


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, RestoreError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, CloudUploadError):
            return RestoreError(str(leaf).replace(FAILED, "restore failed"))
    return leaves[0]


async def prepare_restore(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    *,
    system_id: str,
    target: Path,
    upload_id: str | None = None,
    at: datetime | None = None,
    force: bool = False,
    now: datetime | None = None,
    check_objects: bool = False,
) -> tuple[RestorePlan, Manifest, Index | None]:
    """The upload chosen and the plan for it, with every problem found before a byte is
    downloaded (the target's files and folder, its free space); raises ``RestoreError``
    when there is no such upload. ``check_objects`` also asks the bucket whether every
    object to fetch is there at its size (for a plan shown to a user: a restore itself
    finds out as it fetches)."""
    if problem := system_id_problem(system_id):
        raise RestoreError(problem)
    manifest, index = await find_upload(
        store, config, system_id=system_id, upload_id=upload_id, at=at
    )
    names = [n for n in restore_names(manifest, index) if _plain(n)]  # the plan says why
    existing = await anyio.to_thread.run_sync(inspect_target, target, names)
    plan = plan_restore(
        manifest, index, target=target, existing=existing, force=force,
        now=now or datetime.now(UTC),
    )
    needed = sum(f.size for f in plan.files)
    if folder := await anyio.to_thread.run_sync(target_folder_problem, target, needed):
        plan = msgspec.structs.replace(plan, problems=[folder, *plan.problems])
    if check_objects and (absent := await _absent(store, config, plan.fetch)):
        plan = msgspec.structs.replace(plan, problems=[*plan.problems, *absent])
    return plan, manifest, index


async def _absent(store: ObjectStore, config: AkoshaSyncConfig, fetch: list[Fetch]) -> list[str]:
    """A problem for each object to fetch that the bucket lacks or holds at another size."""
    found: dict[str, int | None] = {}
    limiter = anyio.CapacityLimiter(8)

    async def head(key: str) -> None:
        async def ask() -> int | None:
            try:
                return int((await obstore.head_async(store, key))["size"])
            except FileNotFoundError:
                return None

        async with limiter:
            found[key] = await with_retries(ask, config=config, what=f"looking up {key}")

    async with anyio.create_task_group() as tg:
        for item in fetch:
            tg.start_soon(head, item.key)
    return [
        f"{item.key} is missing from the bucket: this upload cannot be restored whole; "
        "pick an earlier one (`akosha-sync verify --all` shows which are whole)"
        if found[item.key] is None else
        f"{item.key} is {found[item.key]} bytes in the bucket, not the {item.size} the "
        "upload recorded: it is damaged; pick an earlier upload"
        for item in fetch
        if found[item.key] != item.size
    ]


async def restore(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    *,
    system_id: str,
    target: Path,
    upload_id: str | None = None,
    at: datetime | None = None,
    force: bool = False,
    dry_run: bool = False,
    progress: ProgressCallback | None = None,
    now: datetime | None = None,
) -> RestoreResult:
    """Find, plan and (unless ``dry_run``) carry out a restore; raises ``RestoreError``."""
    started = time.monotonic()
    plan, manifest, index = await prepare_restore(
        store, config, system_id=system_id, target=target, upload_id=upload_id, at=at,
        force=force, now=now, check_objects=dry_run,
    )
    if plan.problems and not dry_run:
        raise RestoreError("; ".join(plan.problems))
    if dry_run:
        return RestoreResult(
            upload_id=plan.upload_id,
            system_id=plan.system_id,
            storage_layout=plan.storage_layout,
            target_dir=plan.target_dir,
            files=plan.files,
            bytes_downloaded=0,
            duration_seconds=round(time.monotonic() - started, 3),
            dry_run=True,
            set_aside=plan.set_aside,
            bytes_to_download=plan.bytes_to_download,
            fetch=plan.fetch,
            problems=plan.problems,
            notes=plan.notes,
        )
    result = await execute(store, config, plan, manifest, index, progress=progress)
    result.duration_seconds = round(time.monotonic() - started, 3)
    return result
