"""What is in the bucket: every upload of a system, read from the store itself.

An upload is the folder ``systems/{sid}/uploads/{uid}/``. It is *complete* when its
``manifest.json`` exists and parses; a folder without one (a sync that died, or one
still running) is listed as incomplete, never hidden. Nothing here trusts local state.

Sizes: ``logical_size`` is the sum of the original file sizes the upload restores to;
``bytes_new`` is what this upload added to the bucket: the manifest's own figure when it
records one (blocks layout), else the sizes of the objects inside the upload's folder
(files layout and uploads made before the blocks layout: a reused object lives in the
folder of the upload that first stored it, so objects in the folder are exactly the new
ones).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import obstore

from akosha_sync.repository.checks import CheckRecord, read_records
from akosha_sync.repository.manifest import (
    CLAIM_NAME,
    MANIFEST_NAME,
    Manifest,
    carried_over_from,
    decode_manifest,
    upload_id_order,
    upload_id_time,
    uploads_prefix,
)

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "LEFTOVER",
    "StoredObject",
    "Upload",
    "UploadInfo",
    "list_snapshots",
    "list_system_ids",
    "parse_time",
    "scan_uploads",
    "summarize",
]


_UNPARSABLE = "manifest.json does not parse"


class StoredObject(msgspec.Struct, frozen=True):
    key: str
    size: int
    last_modified: datetime


class Upload(msgspec.Struct, kw_only=True):
    """One upload folder as found in the bucket (internal: carries the manifest)."""

    system_id: str
    upload_id: str
    objects: dict[str, StoredObject]  # file name in the folder -> object
    manifest: Manifest | None = None
    problem: str | None = None  # why it is incomplete

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def damaged(self) -> bool:
        """Committed (its manifest.json is there) but the manifest does not parse:
        what it needs is unknown, so it is neither restorable nor garbage."""
        return self.manifest is None and MANIFEST_NAME in self.objects and bool(
            self.problem and self.problem.startswith(_UNPARSABLE)
        )

    @property
    def time(self) -> datetime:
        """When its sync started, just before reading the databases (the id's time), as
        restic dates a snapshot: what ``restore --at``, ``snapshots`` and retention use.
        The commit came seconds or, over a slow link, minutes later (``uploaded_at``)."""
        from_id = _time_from_id(self.upload_id)  # the time the sync claimed it at
        if from_id is not None:
            return from_id
        if self.manifest is not None:
            try:
                return parse_time(self.manifest.uploaded_at)
            except ValueError:
                pass
        if self.objects:
            return min(o.last_modified for o in self.objects.values()).astimezone(UTC)
        return datetime.fromtimestamp(0, UTC)

    @property
    def layout(self) -> str:
        if self.manifest is None:
            return "unknown"
        return str(getattr(self.manifest, "storage_layout", None) or "files")

    @property
    def first_seen(self) -> datetime | None:
        """The store's time of the folder's first object (the claim, normally)."""
        if not self.objects:
            return None
        return min(o.last_modified for o in self.objects.values())


class UploadInfo(msgspec.Struct, kw_only=True):
    """One line of ``akosha-sync snapshots``."""

    upload_id: str
    system_id: str
    time: str
    complete: bool
    layout: str
    files: list[str]
    logical_size: int
    bytes_new: int
    conversation_count: int | None
    problem: str | None = None
    last_verification: dict[str, Any] | None = None
    # Databases unreadable when it was made, held at an earlier upload's version.
    carried_over: dict[str, str] = msgspec.field(default_factory=dict)
    committed_at: str | None = None  # the manifest's uploaded_at; ``time`` is the start


LEFTOVER = "leftover"  # how the problem of a folder no upload owns begins


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _time_from_id(upload_id: str) -> datetime | None:
    return upload_id_time(upload_id)


async def list_system_ids(store: ObjectStore) -> list[str]:
    listing = await obstore.list_with_delimiter_async(store, prefix="systems/")
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"])


async def scan_uploads(store: ObjectStore, system_id: str) -> list[Upload]:
    """Every upload folder of ``system_id``, oldest first, manifests decoded."""
    prefix = uploads_prefix(system_id)
    folders: dict[str, dict[str, StoredObject]] = {}
    # collect_async, not ``async for``: iterating obstore's ListStream asynchronously
    # aborts the interpreter at exit (obstore 0.12, measured here).
    for meta in await obstore.list(store, prefix=prefix, chunk_size=1000).collect_async():
        key = meta["path"]
        rest = key[len(prefix):]
        uid, sep, name = rest.partition("/")
        if not sep or not name:
            continue
        folders.setdefault(uid, {})[name] = StoredObject(
            key, int(meta["size"]), meta["last_modified"]
        )
    uploads: list[Upload] = []
    for uid in sorted(folders, key=upload_id_order):
        objects = folders[uid]
        upload = Upload(system_id=system_id, upload_id=uid, objects=objects)
        if MANIFEST_NAME not in objects:
            upload.problem = (
                "no manifest.json: a sync still running, or one that died before committing"
                if CLAIM_NAME in objects
                else f"{LEFTOVER} (no manifest.json and no claim: a forgotten upload, or the "
                "late write of a stopped sync); prune removes it"
            )
        else:
            try:
                got = await obstore.get_async(store, objects[MANIFEST_NAME].key)
                raw = await got.bytes_async()
                upload.manifest = decode_manifest(bytes(raw))
            except FileNotFoundError:
                upload.problem = "manifest.json disappeared while listing (forgotten?)"
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                upload.problem = f"{_UNPARSABLE}: {exc}"
        uploads.append(upload)
    # A forgotten files-layout upload can hold whole objects that later uploads reuse:
    # prune keeps them, so "prune removes what is left" would not come true.
    reused = {d.key for u in uploads if u.manifest for d in u.manifest.file_details.values()}
    for upload in uploads:
        keys = {o.key for o in upload.objects.values()}
        if upload.manifest is None and CLAIM_NAME not in upload.objects and keys <= reused:
            upload.problem = (f"{LEFTOVER} of a forgotten upload; it holds only files that "
                              "later uploads reuse, kept while they need them")
    # Upload ids are claim times (YYYYMMDD_HHMMSS_...), in order: a manifest's
    # uploaded_at and an incomplete folder's LastModified are not comparable.
    return uploads


def _logical_size(manifest: Manifest) -> int:
    total = 0
    for name, entry in manifest.file_details.items():
        if name == "memories.json":
            continue
        size = getattr(entry, "original_size", None)
        if size is None:
            size = getattr(entry, "size", 0)
        total += int(size or 0)
    return total


def _bytes_new(upload: Upload) -> int:
    recorded = getattr(upload.manifest, "bytes_new", None) if upload.manifest else None
    if isinstance(recorded, int) and recorded >= 0:
        return recorded
    return sum(o.size for o in upload.objects.values())


def summarize(upload: Upload, record: CheckRecord | None = None) -> UploadInfo:
    manifest = upload.manifest
    last = record.last if record else None
    return UploadInfo(
        upload_id=upload.upload_id,
        system_id=upload.system_id,
        time=upload.time.isoformat().replace("+00:00", "Z"),
        complete=upload.complete,
        layout=upload.layout,
        files=sorted(manifest.file_details or manifest.files) if manifest else sorted(
            n for n in upload.objects if n != CLAIM_NAME
        ),
        logical_size=_logical_size(manifest) if manifest else 0,
        bytes_new=_bytes_new(upload),
        conversation_count=manifest.conversation_count if manifest else None,
        problem=upload.problem,
        last_verification=(
            {"level": last[0], **msgspec.to_builtins(last[1])} if last else None
        ),
        carried_over=carried_over_from(manifest) if manifest else {},
        committed_at=manifest.uploaded_at if manifest else None,
    )


async def list_snapshots(
    store: ObjectStore, system_ids: list[str], *, limit: int | None = None
) -> list[UploadInfo]:
    """Summaries of every upload of ``system_ids``, oldest first (the newest ``limit``)."""
    out: list[UploadInfo] = []
    for sid in system_ids:
        records = await read_records(store, sid)
        uploads = await scan_uploads(store, sid)
        out.extend(summarize(u, records.get(u.upload_id)) for u in uploads)
    # Across systems by claim time (the id's first 15 characters), each system in order.
    out.sort(key=lambda info: (info.upload_id[:15], info.system_id,
                               upload_id_order(info.upload_id)))
    if limit is not None and limit >= 0:
        out = out[len(out) - limit:] if limit else []
    return out
