"""Snapshots: the WAL is included, the live files are untouched, bad files are named."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from akosha_sync.sample import SampleInfo
from akosha_sync.sync.protocol import SnapshotError
from akosha_sync.sync.snapshot import fingerprint, take_snapshot, wal_path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_includes_wal_rows_and_leaves_sources_alone(
    sample: SampleInfo, tmp_path: Path
) -> None:
    src = sample.reflection_path
    assert sample.reflection_wal_path.stat().st_size > 0
    before = {p: _digest(p) for p in (src, wal_path(src))}
    fp_before = fingerprint(src)

    snap = take_snapshot("reflection.duckdb", src, tmp_path / "snap")

    assert {p: _digest(p) for p in (src, wal_path(src))} == before
    assert fingerprint(src) == fp_before
    assert snap.fingerprint == fp_before
    # The copies are byte-identical to the sources, WAL kept beside the database.
    assert snap.wal == str(wal_path(Path(snap.path)))
    assert _digest(Path(snap.path)) == snap.sha256 == before[src]
    assert _digest(Path(snap.wal)) == snap.wal_sha256 == before[wal_path(src)]
    assert (snap.size, snap.wal_size) == (src.stat().st_size, wal_path(src).stat().st_size)
    expected = sample.row_counts[sample.conversations_table]
    assert snap.conversation_count == expected  # WAL rows counted
    con = duckdb.connect(snap.path, read_only=True)
    ids = {r[0] for r in con.execute(f"SELECT id FROM {sample.conversations_table}").fetchall()}
    con.close()
    assert set(sample.wal_conversation_ids) <= ids
    # Verifying the copy left it as it was (read-only: the WAL was not merged).
    assert _digest(Path(snap.path)) == snap.sha256


def test_database_without_wal(sample: SampleInfo, tmp_path: Path) -> None:
    snap = take_snapshot("knowledge_graph.duckdb", sample.knowledge_graph_path, tmp_path / "s")
    assert snap.wal is None and snap.wal_sha256 is None and snap.wal_size == 0
    assert snap.sha256 == _digest(sample.knowledge_graph_path)


def test_missing_database_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        take_snapshot("reflection.duckdb", tmp_path / "nope.duckdb", tmp_path / "snap")


def test_garbage_file_is_a_snapshot_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "reflection.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(SnapshotError) as info:
        take_snapshot("reflection.duckdb", bad, tmp_path / "snap", attempts=2, retry_delay=0)
    assert str(bad) in str(info.value) and info.value.path == str(bad)
