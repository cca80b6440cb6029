"""The repository format: how uploads, pieces and packs lie in the bucket. Pure.

This docstring is the authoritative description of the format (version 1). Anyone
holding the bucket, the minio client, ``zstd`` and ``sha256sum`` can restore a
database from it by hand.

Terms
=====

*system*
    One machine, named by its ``system_id`` (``[A-Za-z0-9_-]{1,100}``). Everything of
    a system lies under ``systems/{sid}/``; systems share nothing.
*upload*
    One sync: a snapshot of the system's databases at one moment. Its id is
    ``YYYYMMDD_HHMMSS_{sid}`` (UTC), ``.N`` appended for the N-th in one second; ids
    sort in time order by :func:`akosha_sync.repository.manifest.upload_id_order`.
*piece*
    A run of bytes of one file, identified by the SHA-256 of its raw (uncompressed)
    bytes, written in lowercase hex. A piece is stored once per system, however many
    uploads and files use it (as a rule, not a guarantee: see Rules).
*pack*
    An object holding many stored pieces back to back. Its id is the SHA-256 of the
    pack object's bytes, so a pack is immutable and self-checking. A pack may end
    with random bytes no piece refers to: a writer appends them when the pieces alone
    would give the id of a pack it must not write (one a prune is deleting, or one
    verify found damaged), so identical bytes never land under a doomed key.

Keys
====

::

    systems/{sid}/uploads/{uid}/_claim.json     reserves the upload id (conditional create),
                                                the in-flight marker {upload_id, host, claimed_at}
    systems/{sid}/uploads/{uid}/memories.json   Akosha's ingestion file (uncompressed JSON)
    systems/{sid}/uploads/{uid}/index.json      blocks layout: where every piece of every file is
    systems/{sid}/uploads/{uid}/manifest.json   written LAST with a conditional create: the commit
    systems/{sid}/uploads/{uid}/{file}          files layout: the whole file (zstd or raw)
    systems/{sid}/packs/{pack_id[:2]}/{pack_id}.pack
    systems/{sid}/locks/...                     prune's lease / deletion plan
    systems/{sid}/damaged.json                  objects verify found damaged: never reused
    systems/{sid}/checks/{uid}.json             verify's last result per level

An upload exists once its ``manifest.json`` does; an upload directory without one is
an interrupted sync and is ignored by every reader (and may be cleaned up).

Splitting a file into pieces
============================

A DuckDB database file is split at DuckDB's own boundaries:

* piece 0 is the header area, bytes ``[0, 12288)``: the 4 KiB main header and the
  two 4 KiB database headers (which alternate at each checkpoint);
* then fixed blocks of ``block_size`` bytes from offset 12288. ``block_size`` is read
  from the database header with the higher iteration count (the little-endian u64 at
  byte 40 of that header, i.e. file offset 4136 or 8232); when it is not a power of two
  between 16 KiB and 16 MiB (not a DuckDB file, or a future format) 262144 is used;
* the last piece may be short; a file shorter than 12288 bytes is a single piece.

DuckDB checkpoints copy-on-write, so a checkpoint after a few inserts changes a
handful of blocks and the header area; every other piece is unchanged and not sent.

A WAL (``NAME.duckdb.wal``) is split into pieces of the same ``block_size`` from
offset 0. Any other file is split like a WAL with 262144.

Storing a piece
===============

A piece is stored as the zstd frame (level 1) of its bytes, or as its raw bytes when
compression does not make it smaller (``"zstd"`` or ``"raw"`` in its location). New
pieces of an upload are appended, in file order, into a pack; a pack is sealed when it
reaches :data:`PACK_TARGET_SIZE` (8 MiB; the design note said ~16 MiB, halved so that
a sync and a restore each stay under 150 MB of memory with packs in flight while a
cold 250 MB sync is still ~32 PUTs) and written with ONE plain PUT (never
multipart). A pack is nothing but the concatenation of its stored pieces: no header,
no trailer; the index says where each piece starts. Pieces are never split across
packs.

index.json (one per upload, blocks layout)
==========================================

JSON, written after all its packs and before the manifest::

    {"version": 1, "upload_id": "...", "system_id": "...",
     "packs": {"<pack_id>": {"key": "systems/{sid}/packs/ab/<pack_id>.pack", "size": N}},
     "files": {
       "reflection.duckdb": {"size": N, "sha256": "<whole file>", "block_size": 262144,
          "pieces": [["<piece sha256>", "<pack_id>", offset, stored_length, length, "zstd"], ...]},
       "reflection.duckdb.wal": {...}}}

``pieces`` is the file in order: piece *i* covers the file bytes starting at the sum of
the ``length`` of pieces ``0..i-1``. A piece is at bytes
``[offset, offset + stored_length)`` of its pack. ``packs`` lists every pack that any
piece refers to (and only those), with the pack's size, so a restore needs this one
object to fetch everything. The same piece id may appear many times (in both
databases, or at several places of one file: e.g. empty blocks).

Prune may rewrite an upload's ``index.json`` (same key, new piece locations) after it
repacks, always BEFORE it deletes the old pack. Piece SHA-256s and whole-file SHA-256s
make a stale or damaged index detectable: a reader checks every piece after
decompression and every whole file before using it, and first that the index is its
manifest's (:func:`index_mismatches`: same upload, and each file's size and SHA-256 as
the manifest records them), since an index of another upload passes its own checks.

manifest.json
=============

Akosha's ``SystemMemoryUploadManifest`` fields (``uploaded_at``,
``conversation_count``, ``total_size_bytes``, ``version``, ``system_type``,
``checksum``, ``compressed``, ``compression_format``, ``files`` as bare names,
``metadata``), which Akosha validates, then ours, which it ignores:

``upload_id``, ``system_id``, ``timestamp``
    as in the key.
``storage_layout``
    ``"blocks"`` or ``"files"``. Manifests written before this format have none and
    read as ``"files"``.
``index``
    the key of ``index.json`` (blocks layout), else null.
``bytes_new``
    bytes this upload wrote that no earlier upload had: new packs plus its small
    objects (index, memories, manifest excluded as it is written last).
``file_details[name]``
    per file: ``original_size``, whole-file ``sha256``, ``compression``. Files layout:
    ``key`` (the object; it may lie in an earlier upload, then ``reused_from`` names
    that upload), ``stored_size``, ``stored_sha256``. Blocks layout: ``key`` is the
    index key, ``stored_size`` the sum of the stored lengths of its pieces,
    ``stored_sha256`` equals ``sha256`` (there is no single stored object),
    ``pieces`` (count) and ``new_pieces`` (pieces this upload stored first). On a
    database: ``row_counts`` {table: rows} of its main tables at upload time and
    ``wal`` naming its WAL file in this upload when it had one.

Restoring by hand (blocks layout)
=================================

Read ``manifest.json``, then the ``index`` it names. For each file, for each piece in
order: take ``stored_length`` bytes at ``offset`` of the pack ``packs[pack_id].key``,
``zstd -d`` them if ``"zstd"``, check their SHA-256 is the piece id, append. Check the
whole file's SHA-256 and size. Put the WAL beside its database under its name.

Rules
=====

* An upload never points at an object that is not there: the packs it reuses are
  checked against the bucket (one LIST of ``systems/{sid}/packs/``) before its
  manifest is written.
* Nothing is ever deleted once a manifest for that upload may exist.
* Which stored pieces a sync reuses is the writer's choice, not the format's: this
  version reuses those of the system's last upload, and of an upload restored into
  ``data_dir`` since (``restored.json`` in the state folder), never a damaged or
  condemned pack's. A piece can therefore lie in more than one pack (the same bytes
  back after several uploads without them); readers take the one the index names.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from akosha_sync.repository.manifest import Manifest

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "HEADER_AREA",
    "INDEX_NAME",
    "INDEX_VERSION",
    "LAYOUT_BLOCKS",
    "LAYOUT_FILES",
    "PACK_TARGET_SIZE",
    "Index",
    "IndexFile",
    "PackRef",
    "Piece",
    "block_size_from_header",
    "decode_index",
    "encode_index",
    "index_key",
    "index_mismatches",
    "pack_id_from_key",
    "pack_key",
    "packs_prefix",
]

INDEX_NAME = "index.json"
INDEX_VERSION = 1
LAYOUT_BLOCKS = "blocks"
LAYOUT_FILES = "files"
StorageLayout = Literal["blocks", "files"]

# DuckDB: 4 KiB main header + two 4 KiB database headers, then blocks.
HEADER_AREA = 3 * 4096
DEFAULT_BLOCK_SIZE = 256 * 1024
_MIN_BLOCK, _MAX_BLOCK = 16 * 1024, 16 * 1024 * 1024
# Offset of block_alloc_size in a database header: checksum, iteration, meta_block,
# free_list, block_count (u64 each), then block_alloc_size.
_HEADER_ITERATION_AT = 8
_HEADER_BLOCK_SIZE_AT = 40
# Big enough that a cold 250 MB sync is a few dozen PUTs, small enough that the four
# packs a sync may hold (building, waiting, two uploading) stay ~32 MiB.
PACK_TARGET_SIZE = 8 * 1024 * 1024

Compression = Literal["zstd", "raw"]

_PACK_KEY_RE = re.compile(r"/packs/[0-9a-f]{2}/([0-9a-f]{64})\.pack$")


class Piece(msgspec.Struct, frozen=True, array_like=True):
    """One piece of a file and where it is stored:
    ``[sha256, pack_id, offset, stored_length, length, compression]``."""

    sha256: str
    pack_id: str
    offset: int
    stored_length: int
    length: int
    compression: Compression


class PackRef(msgspec.Struct, frozen=True):
    key: str
    size: int


class IndexFile(msgspec.Struct, frozen=True):
    size: int
    sha256: str
    block_size: int
    pieces: list[Piece]


class Index(msgspec.Struct, kw_only=True):
    version: int = INDEX_VERSION
    upload_id: str
    system_id: str
    packs: dict[str, PackRef] = msgspec.field(default_factory=dict)
    files: dict[str, IndexFile] = msgspec.field(default_factory=dict)


def index_mismatches(manifest: Manifest, index: Index) -> list[str]:
    """Where an index is not its manifest's (another upload's copied over it, say). Pure.

    The manifest names the index and records each file's size and SHA-256; an index
    that restores other files, or other bytes, would pass every hash check of its own
    pieces, so these must agree before the index is trusted."""
    problems: list[str] = []
    if (index.upload_id, index.system_id) != (manifest.upload_id, manifest.system_id):
        problems.append(f"the index is upload {index.upload_id} of {index.system_id}'s, not "
                        f"{manifest.upload_id} of {manifest.system_id}'s")
    listed = {n for n in manifest.file_details if n != "memories.json"}
    for name in sorted(set(index.files) - listed):
        problems.append(f"the index holds {name}, which the manifest does not list")
    for name in sorted(listed & set(index.files)):
        entry, detail = index.files[name], manifest.file_details[name]
        if (entry.size, entry.sha256) != (detail.original_size, detail.sha256):
            problems.append(f"{name}: the index has {entry.size} bytes, SHA-256 "
                            f"{entry.sha256[:16]}; the manifest {detail.original_size} bytes, "
                            f"{detail.sha256[:16]}")
    return problems


def packs_prefix(system_id: str) -> str:
    return f"systems/{system_id}/packs/"


def pack_key(system_id: str, pack_id: str) -> str:
    return f"{packs_prefix(system_id)}{pack_id[:2]}/{pack_id}.pack"


def pack_id_from_key(key: str) -> str | None:
    """The pack id of a pack key, or None if ``key`` is not one."""
    match = _PACK_KEY_RE.search(key)
    return match.group(1) if match else None


def index_key(system_id: str, upload_id: str) -> str:
    return f"systems/{system_id}/uploads/{upload_id}/{INDEX_NAME}"


def _u64(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 8], "little")


def block_size_from_header(header: bytes) -> int:
    """The block size a DuckDB header area declares, else :data:`DEFAULT_BLOCK_SIZE`."""
    best: tuple[int, int] | None = None
    for start in (4096, 8192):
        fields = header[start : start + 48]
        if len(fields) < 48:
            return DEFAULT_BLOCK_SIZE
        iteration = _u64(fields, _HEADER_ITERATION_AT)
        size = _u64(fields, _HEADER_BLOCK_SIZE_AT)
        if best is None or iteration > best[0]:
            best = (iteration, size)
    assert best is not None
    size = best[1]
    if _MIN_BLOCK <= size <= _MAX_BLOCK and size & (size - 1) == 0:
        return size
    return DEFAULT_BLOCK_SIZE


def encode_index(index: Index) -> bytes:
    return msgspec.json.encode(index)


def decode_index(data: bytes) -> Index:
    """Parse ``index.json``; raises ``msgspec.DecodeError``/``ValidationError`` if damaged."""
    index = msgspec.json.decode(data, type=Index)
    if index.version != INDEX_VERSION:
        raise msgspec.ValidationError(
            f"index.json version {index.version} is not supported (this akosha-sync reads "
            f"version {INDEX_VERSION}); upgrade akosha-sync"
        )
    return index
