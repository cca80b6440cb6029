"""The pure parts of the repository: format, piece splitting, packs, the restore plan."""

from __future__ import annotations

import hashlib
import os
import random
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import msgspec
import pytest

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.format import (
    DEFAULT_BLOCK_SIZE,
    HEADER_AREA,
    Index,
    IndexFile,
    PackRef,
    Piece,
    block_size_from_header,
    decode_index,
    encode_index,
    pack_id_from_key,
    pack_key,
)
from akosha_sync.repository.manifest import FileEntry, Manifest, decode_manifest
from akosha_sync.repository.packs import PackBuilder, PieceError, extract_piece
from akosha_sync.repository.pieces import FileDigest, iter_pieces
from akosha_sync.repository.restore import TargetFile, plan_restore


def _duckdb_file(path: Path, rows: int = 300_000) -> Path:
    con = duckdb.connect(str(path))
    con.execute(f"CREATE TABLE t AS SELECT range AS i, random() AS r FROM range({rows})")
    con.close()
    return path


def test_block_size_is_read_from_the_current_database_header(tmp_path: Path) -> None:
    header = _duckdb_file(tmp_path / "a.duckdb").read_bytes()[:HEADER_AREA]
    assert block_size_from_header(header) == 262144
    # The header with the higher iteration wins; a nonsense size falls back to 256 KiB.
    forged = bytearray(header)
    for start, iteration, size in ((4096, 9, 65536), (8192, 3, 262144)):
        forged[start + 8 : start + 16] = iteration.to_bytes(8, "little")
        forged[start + 40 : start + 48] = size.to_bytes(8, "little")
    assert block_size_from_header(bytes(forged)) == 65536
    forged[4096 + 40 : 4096 + 48] = (12345).to_bytes(8, "little")
    assert block_size_from_header(bytes(forged)) == DEFAULT_BLOCK_SIZE
    assert block_size_from_header(b"not a database") == DEFAULT_BLOCK_SIZE


def test_database_splits_at_its_header_area_then_blocks(tmp_path: Path) -> None:
    path = _duckdb_file(tmp_path / "a.duckdb")
    data = path.read_bytes()
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = FileDigest()
        pieces = list(iter_pieces(fd, digest, database=True, size=len(data)))
    finally:
        os.close(fd)
    assert len(pieces[0]) == HEADER_AREA
    assert {len(p) for p in pieces[1:-1]} == {262144} and 0 < len(pieces[-1]) <= 262144
    assert b"".join(pieces) == data
    assert digest.sha256 == hashlib.sha256(data).hexdigest() and digest.size == len(data)
    assert digest.block_size == 262144


def test_wal_and_other_files_split_from_offset_zero(tmp_path: Path) -> None:
    path = tmp_path / "x.wal"
    path.write_bytes(random.Random(1).randbytes(600_000))
    fd = os.open(path, os.O_RDONLY)
    try:
        pieces = list(iter_pieces(fd, first := FileDigest(), database=False, size=600_000))
        short = list(iter_pieces(fd, second := FileDigest(), database=False, size=1000))
        first.close()
        second.close()
    finally:
        os.close(fd)
    assert [len(p) for p in pieces] == [262144, 262144, 600_000 - 2 * 262144]
    assert short == [path.read_bytes()[:1000]]  # stops at the size seen when locked


def test_pack_stores_compressible_pieces_zstd_and_others_raw() -> None:
    builder = PackBuilder(target=1 << 20)
    text = b"conversation " * 20_000
    noise = random.Random(2).randbytes(200_000)
    for data in (text, noise):
        assert builder.add(hashlib.sha256(data).hexdigest(), data) is None
    pack = builder.seal()
    assert pack is not None and builder.seal() is None
    assert pack.pack_id == hashlib.sha256(pack.data).hexdigest()
    first, second = pack.pieces
    assert (first.compression, second.compression) == ("zstd", "raw")
    assert first.stored_length < len(text) and second.stored_length == len(noise)
    assert second.offset == first.stored_length
    assert extract_piece(pack.data, first, where="k") == text
    assert extract_piece(pack.data, second, where="k") == noise
    damaged = bytearray(pack.data)
    damaged[second.offset + 10] ^= 1
    with pytest.raises(PieceError, match="pack-key"):
        extract_piece(bytes(damaged), second, where="pack-key")
    with pytest.raises(PieceError, match="truncated"):
        extract_piece(pack.data[:-1], second, where="pack-key")


def test_pack_is_sealed_when_it_reaches_its_target_size() -> None:
    builder = PackBuilder(compress=False, target=500_000)
    rng = random.Random(3)
    sealed = [builder.add(str(i), rng.randbytes(200_000)) for i in range(3)]
    assert sealed[:2] == [None, None] and sealed[2] is not None
    assert len(sealed[2].data) == 600_000 and len(builder) == 0


def test_index_round_trip_and_keys() -> None:
    pid = "ab" + "0" * 62
    index = Index(
        upload_id="u", system_id="s",
        packs={pid: PackRef(pack_key("s", pid), 10)},
        files={"a.duckdb": IndexFile(
            5, "f" * 64, 262144, [Piece("c" * 64, pid, 0, 10, 5, "zstd")])},
    )
    raw = encode_index(index)
    assert b'"pieces":[["' in raw  # pieces are compact arrays
    assert decode_index(raw) == index
    assert pack_key("s", pid) == f"systems/s/packs/ab/{pid}.pack"
    assert pack_id_from_key(pack_key("s", pid)) == pid and pack_id_from_key("x/y.pack") is None
    with pytest.raises(msgspec.ValidationError, match="version"):
        decode_index(raw.replace(b'"version":1', b'"version":2'))


def test_manifest_without_storage_layout_reads_as_files() -> None:
    old = b'{"uploaded_at": "2026-01-01T00:00:00Z", "conversation_count": 0, ' \
          b'"total_size_bytes": 0, "compressed": false}'
    manifest = decode_manifest(old)
    assert manifest.storage_layout == "files" and manifest.index is None


def test_storage_layout_setting_is_checked() -> None:
    assert AkoshaSyncConfig().storage_layout == "blocks"
    assert not [p for p in AkoshaSyncConfig(storage_layout="files").validate()
                if "storage_layout" in p]
    assert any("storage_layout" in p for p in AkoshaSyncConfig(storage_layout="x").validate())


def _files_manifest() -> Manifest:
    entry = FileEntry(key="systems/s/uploads/u/r.duckdb", original_size=100, stored_size=40,
                      sha256="a" * 64, stored_sha256="b" * 64, compression="zstd", wal=None)
    memories = FileEntry(key="systems/s/uploads/u/memories.json", original_size=2,
                         stored_size=2, sha256="c" * 64, stored_sha256="c" * 64,
                         compression=None)
    return Manifest(uploaded_at="2026-01-01T00:00:00Z", conversation_count=0,
                    total_size_bytes=42, compressed=True, upload_id="u", system_id="s",
                    file_details={"r.duckdb": entry, "memories.json": memories})


def test_plan_names_what_it_fetches_and_refuses_without_force(tmp_path: Path) -> None:
    now = datetime(2026, 2, 3, 4, 5, 6, tzinfo=UTC)
    manifest = _files_manifest()
    fresh = plan_restore(manifest, None, target=tmp_path, existing={}, force=False, now=now)
    assert fresh.problems == [] and [f.name for f in fresh.files] == ["r.duckdb"]
    assert fresh.bytes_to_download == 40 and fresh.storage_layout == "files"

    there = {"r.duckdb": TargetFile(exists=True), "r.duckdb.wal": TargetFile(exists=True)}
    refused = plan_restore(manifest, None, target=tmp_path, existing=there, force=False, now=now)
    assert refused.problems and "--force" in refused.problems[0]
    forced = plan_restore(manifest, None, target=tmp_path, existing=there, force=True, now=now)
    assert forced.problems == []
    assert forced.files[0].backup == str(tmp_path / "r.duckdb.bak-20260203T040506Z")
    # The old WAL is set aside too: DuckDB would replay it into the restored database.
    assert [f.name for f in forced.set_aside] == ["r.duckdb.wal"]


def test_plan_refuses_a_locked_database_even_with_force(tmp_path: Path) -> None:
    locked = {"r.duckdb": TargetFile(exists=True, locked_by_other=True)}
    plan = plan_restore(_files_manifest(), None, target=tmp_path, existing=locked, force=True,
                        now=datetime.now(UTC))
    assert len(plan.problems) == 1
    assert str(tmp_path / "r.duckdb") in plan.problems[0] and "running process" in plan.problems[0]


def test_file_digest_hashes_in_its_thread_and_ends_it_even_when_abandoned(
    tmp_path: Path,
) -> None:
    import threading

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 262144 + 123))
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = FileDigest()
        pieces = list(iter_pieces(fd, digest, database=False))
        assert [len(p) for p in pieces] == [262144] * 3 + [123]
        assert digest.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert digest.size == path.stat().st_size
        abandoned = FileDigest()  # a read that failed half-way
        next(iter_pieces(fd, abandoned, database=False))
        thread = abandoned._thread
        assert isinstance(thread, threading.Thread) and thread.is_alive()
        abandoned.close()
        assert not thread.is_alive()
    finally:
        os.close(fd)
