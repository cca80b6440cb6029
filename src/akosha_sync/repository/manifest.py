"""Pure logic of an upload: ids, the key layout, and the manifest. No I/O here.

Layout (the seed's)::

    systems/{system_id}/uploads/{upload_id}/{db_name}
    systems/{system_id}/uploads/{upload_id}/memories.json   # Akosha ingests these rows
    systems/{system_id}/uploads/{upload_id}/manifest.json   # written last: the commit

Upload ids are ``YYYYMMDD_HHMMSS_{system_id}`` in UTC; a second upload in the same
second becomes ``..._{system_id}.2`` ('.' cannot occur in a system id, so the suffix
is never mistaken for part of it).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

__all__ = [
    "CLAIM_NAME",
    "COMPRESSION_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "MEMORIES_NAME",
    "FileEntry",
    "Manifest",
    "akosha_manifest_problems",
    "build_manifest",
    "carried_over_from",
    "claim_key",
    "decode_manifest",
    "encode_manifest",
    "make_upload_id",
    "manifest_checksum",
    "manifest_key",
    "memories_key",
    "object_key",
    "upload_dir",
    "upload_id_order",
    "upload_id_time",
    "uploads_prefix",
]

MANIFEST_NAME = "manifest.json"
MEMORIES_NAME = "memories.json"
CLAIM_NAME = "_claim.json"  # reserves an upload id before anything is written under it
MANIFEST_VERSION = "1.0"
COMPRESSION_FORMAT = "zstd"
SYSTEM_TYPE = "session-buddy"

_UPLOAD_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
_FILE_NAME_RE = re.compile(r"^[a-zA-Z0-9_\-.]+$")
_SYSTEM_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,100}$")
_VERSION_RE = re.compile(r"^\d+\.\d+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CONVERSATION_COUNT = 1_000_000


def make_upload_id(system_id: str, now: datetime, attempt: int = 0) -> str:
    """``YYYYMMDD_HHMMSS_{system_id}``; attempt N > 0 appends ``.{N+1}``."""
    stamp = now.astimezone(UTC).strftime("%Y%m%d_%H%M%S")
    base = f"{stamp}_{system_id}"
    return base if attempt == 0 else f"{base}.{attempt + 1}"


def upload_id_time(upload_id: str) -> datetime | None:
    """The UTC time an upload id names (``YYYYMMDD_HHMMSS_...``), None if it names none."""
    try:
        return datetime.strptime(upload_id[:15], "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
    except ValueError:
        return None


def upload_id_problem(value: str) -> str | None:
    """Why ``value`` cannot name an upload (one a user asked for), or None."""
    if _UPLOAD_ID_RE.match(value) and value.strip(".") != "":
        return None
    return (f"{value!r} is not an upload id (they look like 20261204_181500_myhost); "
            "`akosha-sync snapshots` lists them.")


def upload_id_order(upload_id: str) -> tuple[str, int]:
    """Sort key putting upload ids in time order (``..._host.10`` after ``..._host.9``)."""
    base, dot, suffix = upload_id.rpartition(".")
    if dot and suffix.isdigit():
        return base, int(suffix)
    return upload_id, 1


def uploads_prefix(system_id: str) -> str:
    return f"systems/{system_id}/uploads/"


def upload_dir(system_id: str, upload_id: str) -> str:
    return f"systems/{system_id}/uploads/{upload_id}"


def object_key(db_name: str, upload_id: str, system_id: str) -> str:
    """Where a database of an upload is stored (without the bucket)."""
    return f"{upload_dir(system_id, upload_id)}/{db_name}"


def manifest_key(system_id: str, upload_id: str) -> str:
    return f"{upload_dir(system_id, upload_id)}/{MANIFEST_NAME}"


def memories_key(system_id: str, upload_id: str) -> str:
    return f"{upload_dir(system_id, upload_id)}/{MEMORIES_NAME}"


def claim_key(system_id: str, upload_id: str) -> str:
    return f"{upload_dir(system_id, upload_id)}/{CLAIM_NAME}"


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One stored file of an upload, enough to fetch, verify and restore it."""

    key: str
    original_size: int
    stored_size: int
    sha256: str  # of the original (uncompressed) bytes
    stored_sha256: str  # of the bytes as stored
    compression: str | None
    # Set when this upload reuses an object stored by an earlier one.
    reused_from: str | None = None
    # On a database: its conversations (WAL rows included) and the name of its WAL
    # file in this upload, if it had one; restore by putting both side by side.
    conversation_count: int | None = None
    wal: str | None = None
    # Blocks layout (see akosha_sync.repository.format): pieces of the file and how many
    # of them this upload stored first; on a database, rows of its main tables.
    pieces: int | None = None
    new_pieces: int | None = None
    row_counts: dict[str, int] | None = None


class Manifest(msgspec.Struct, kw_only=True):
    """``manifest.json``: Akosha's schema fields first, then ours (ignored by Akosha)."""

    uploaded_at: str
    conversation_count: int
    total_size_bytes: int
    version: str = MANIFEST_VERSION
    system_type: str = SYSTEM_TYPE
    compressed: bool
    compression_format: str | None = None
    files: list[str] = msgspec.field(default_factory=list)
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    checksum: str = ""
    upload_id: str = ""
    system_id: str = ""
    timestamp: str = ""
    file_details: dict[str, FileEntry] = msgspec.field(default_factory=dict)
    # Manifests written before the blocks layout have none of these: "files" layout.
    storage_layout: str = "files"
    index: str | None = None
    bytes_new: int | None = None


def carried_over_from(manifest: Manifest) -> dict[str, str]:
    """File name -> the upload whose version of it this upload holds, for databases that
    could not be read when it was made (``metadata.carried_over``); empty otherwise."""
    found = manifest.metadata.get("carried_over")
    if not isinstance(found, dict):
        return {}
    return {str(k): str(v) for k, v in found.items()}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def build_manifest(
    *,
    system_id: str,
    upload_id: str,
    uploaded_at: datetime,
    files: dict[str, FileEntry],
    conversation_count: int,
    metadata: dict[str, Any] | None = None,
    storage_layout: str = "files",
    index: str | None = None,
    bytes_new: int | None = None,
) -> Manifest:
    """The manifest of a complete upload, its checksum filled in."""
    compressed = any(entry.compression for entry in files.values())
    manifest = Manifest(
        uploaded_at=_iso(uploaded_at),
        conversation_count=max(0, min(conversation_count, MAX_CONVERSATION_COUNT)),
        total_size_bytes=sum(entry.stored_size for entry in files.values()),
        compressed=compressed,
        compression_format=COMPRESSION_FORMAT if compressed else None,
        files=sorted(files),
        metadata=dict(metadata or {}),
        upload_id=upload_id,
        system_id=system_id,
        timestamp=_iso(uploaded_at),
        file_details=dict(files),
        storage_layout=storage_layout,
        index=index,
        bytes_new=bytes_new,
    )
    manifest.checksum = manifest_checksum(manifest)
    return manifest


def _as_dict(manifest: Manifest) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(manifest)
    # Akosha: compression_format is present if and only if compressed is true.
    if data.get("compression_format") is None:
        data.pop("compression_format", None)
    return data


def manifest_checksum(manifest: Manifest) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys) without ``checksum``."""
    data = _as_dict(manifest)
    data.pop("checksum", None)
    return hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()


def encode_manifest(manifest: Manifest) -> bytes:
    return msgspec.json.format(msgspec.json.encode(_as_dict(manifest)), indent=2) + b"\n"


def decode_manifest(data: bytes) -> Manifest:
    return msgspec.json.decode(data, type=Manifest)


def akosha_manifest_problems(
    data: dict[str, Any], *, now: datetime | None = None
) -> list[str]:
    """Check a decoded manifest against Akosha's ``SystemMemoryUploadManifest`` rules."""
    problems: list[str] = []
    now = now or datetime.now(UTC)
    raw_at = data.get("uploaded_at")
    try:
        at = datetime.fromisoformat(str(raw_at).replace("Z", "+00:00"))
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        if at < now - timedelta(days=365) or at > now + timedelta(minutes=5):
            problems.append(f"uploaded_at {raw_at} is outside the accepted window")
    except ValueError:
        problems.append(f"uploaded_at {raw_at!r} is not a datetime")
    count = data.get("conversation_count")
    if not isinstance(count, int) or isinstance(count, bool) or not (
        0 <= count <= MAX_CONVERSATION_COUNT
    ):
        problems.append(f"conversation_count {count!r} is not an int in 0..1000000")
    size = data.get("total_size_bytes")
    if size is not None and not (isinstance(size, int) and 0 <= size <= 10**11):
        problems.append(f"total_size_bytes {size!r} is out of range")
    version = data.get("version")
    if version is not None and not _VERSION_RE.match(str(version)):
        problems.append(f"version {version!r} does not match N.N")
    system_type = data.get("system_type")
    if system_type is not None and not 1 <= len(str(system_type)) <= 50:
        problems.append("system_type must be 1-50 characters")
    checksum = data.get("checksum")
    if checksum is not None and not _SHA256_RE.match(str(checksum)):
        problems.append("checksum is not 64 lowercase hex digits")
    compressed = data.get("compressed")
    fmt = data.get("compression_format")
    if fmt is not None and fmt not in ("gzip", "zstd", "lz4"):
        problems.append(f"compression_format {fmt!r} is not gzip, zstd or lz4")
    if bool(compressed) != (fmt is not None):
        problems.append("compression_format must be set if and only if compressed is true")
    files = data.get("files")
    if files is not None:
        if not isinstance(files, list):
            problems.append("files must be a list of names")
        else:
            for name in files:
                if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
                    problems.append(f"files entry {name!r} is not a bare file name")
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        problems.append("metadata must be an object")
    system_id = data.get("system_id")
    if system_id is not None and not _SYSTEM_ID_RE.match(str(system_id)):
        problems.append(f"system_id {system_id!r} is not in Akosha's charset")
    upload_id = data.get("upload_id")
    if upload_id is not None and not _UPLOAD_ID_RE.match(str(upload_id)):
        problems.append(f"upload_id {upload_id!r} is not in Akosha's charset")
    return problems
