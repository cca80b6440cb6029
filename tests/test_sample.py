"""The sample generator produces Session-Buddy-shaped databases with a live WAL."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from akosha_sync.sample import (
    SAMPLE_EPOCH,
    SOURCE_TYPES,
    SampleInfo,
    add_conversations,
    create_sample_databases,
    grow_to_size,
)

# Column name -> type as DuckDB reports it (TEXT is VARCHAR, REAL is FLOAT).
CONVERSATIONS_V2 = {
    "id": "VARCHAR",
    "content": "VARCHAR",
    "embedding": "FLOAT[384]",
    "category": "VARCHAR",
    "subcategory": "VARCHAR",
    "importance_score": "FLOAT",
    "memory_tier": "VARCHAR",
    "access_count": "INTEGER",
    "last_accessed": "TIMESTAMP",
    "project": "VARCHAR",
    "namespace": "VARCHAR",
    "timestamp": "TIMESTAMP",
    "session_id": "VARCHAR",
    "user_id": "VARCHAR",
    "searchable_content": "VARCHAR",
    "reasoning": "VARCHAR",
    "metadata": "VARCHAR",
    "source_type": "VARCHAR",
    "turn_parent_id": "VARCHAR",
    "causal_parent_id": "VARCHAR",
}
REFLECTIONS_V2 = {
    "id": "VARCHAR",
    "content": "VARCHAR",
    "embedding": "FLOAT[384]",
    "category": "VARCHAR",
    "importance_score": "FLOAT",
    "memory_tier": "VARCHAR",
    "tags": "VARCHAR[]",
    "related_entities": "VARCHAR[]",
    "timestamp": "TIMESTAMP",
    "project": "VARCHAR",
    "namespace": "VARCHAR",
    "access_count": "INTEGER",
    "last_accessed": "TIMESTAMP",
    "created_at": "TIMESTAMP",
    "updated_at": "TIMESTAMP",
    "insight_type": "VARCHAR",
    "usage_count": "INTEGER",
    "last_used_at": "TIMESTAMP",
    "confidence_score": "FLOAT",
    "fingerprint": "BLOB",
    "subcategory": "VARCHAR",
    "metadata": "JSON",
}
LEGACY_CONVERSATIONS = {
    "id": "VARCHAR",
    "content": "VARCHAR",
    "embedding": "FLOAT[384]",
    "project": "VARCHAR",
    "timestamp": "TIMESTAMP",
    "metadata": "JSON",
}
LEGACY_REFLECTIONS = {
    "id": "VARCHAR",
    "content": "VARCHAR",
    "embedding": "FLOAT[384]",
    "project": "VARCHAR",
    "tags": "VARCHAR[]",
    "timestamp": "TIMESTAMP",
    "metadata": "JSON",
}
KG_ENTITIES = {
    "id": "VARCHAR",
    "name": "VARCHAR",
    "entity_type": "VARCHAR",
    "observations": "VARCHAR[]",
    "properties": "JSON",
    "created_at": "TIMESTAMP",
    "updated_at": "TIMESTAMP",
    "metadata": "JSON",
    "embedding": "FLOAT[384]",
}
KG_RELATIONSHIPS = {
    "id": "VARCHAR",
    "from_entity": "VARCHAR",
    "to_entity": "VARCHAR",
    "relation_type": "VARCHAR",
    "properties": "JSON",
    "created_at": "TIMESTAMP",
    "updated_at": "TIMESTAMP",
    "metadata": "JSON",
}


def read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """Read-only, so the WAL is replayed in memory but not merged into the file."""
    return duckdb.connect(str(path), read_only=True)


def columns(path: Path, table: str) -> dict[str, str]:
    con = read_only(path)
    try:
        rows = con.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = ? ORDER BY ordinal_position",
            [table],
        ).fetchall()
    finally:
        con.close()
    return {str(name): str(dtype) for name, dtype in rows}


def scalar(path: Path, sql: str) -> object:
    con = read_only(path)
    try:
        row = con.execute(sql).fetchone()
    finally:
        con.close()
    assert row is not None
    return row[0]


def tables(path: Path) -> set[str]:
    con = read_only(path)
    try:
        rows = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    finally:
        con.close()
    return {str(r[0]) for r in rows}


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> SampleInfo:
    """One default sample shared by the read-only checks of this module."""
    return create_sample_databases(tmp_path_factory.mktemp("v2") / "claude-data")


def test_files_tables_and_columns(v2: SampleInfo) -> None:
    assert v2.reflection_path.name == "reflection.duckdb"
    assert v2.knowledge_graph_path.name == "knowledge_graph.duckdb"
    assert v2.reflection_path.is_file()
    assert v2.knowledge_graph_path.is_file()
    assert not v2.legacy
    assert {"conversations_v2", "reflections_v2"} <= tables(v2.reflection_path)
    assert {"conversations", "reflections"}.isdisjoint(tables(v2.reflection_path))
    # a few of Session-Buddy's other tables are there too
    assert {"reflection_tags", "session_links", "memory_access_log"} <= tables(v2.reflection_path)
    assert tables(v2.knowledge_graph_path) == {"kg_entities", "kg_relationships"}

    assert columns(v2.reflection_path, "conversations_v2") == CONVERSATIONS_V2
    assert columns(v2.reflection_path, "reflections_v2") == REFLECTIONS_V2
    assert columns(v2.knowledge_graph_path, "kg_entities") == KG_ENTITIES
    assert columns(v2.knowledge_graph_path, "kg_relationships") == KG_RELATIONSHIPS


def test_constraints_and_defaults(v2: SampleInfo) -> None:
    con = read_only(v2.reflection_path)
    try:
        constraints = con.execute(
            "SELECT table_name, constraint_type, constraint_text, constraint_column_names "
            "FROM duckdb_constraints() "
            "WHERE table_name IN ('conversations_v2', 'reflections_v2')"
        ).fetchall()
        defaults = dict(
            con.execute(
                "SELECT column_name, column_default FROM information_schema.columns "
                "WHERE table_name = 'conversations_v2' AND column_default IS NOT NULL"
            ).fetchall()
        )
    finally:
        con.close()
    kinds = {(t, k, tuple(cols)) for t, k, _, cols in constraints}
    assert ("conversations_v2", "PRIMARY KEY", ("id",)) in kinds
    assert ("reflections_v2", "PRIMARY KEY", ("id",)) in kinds
    assert ("conversations_v2", "NOT NULL", ("content",)) in kinds
    assert ("conversations_v2", "NOT NULL", ("category",)) in kinds
    assert ("reflections_v2", "NOT NULL", ("content",)) in kinds
    assert ("reflections_v2", "NOT NULL", ("category",)) in kinds
    checks = [text for t, k, text, _ in constraints if t == "conversations_v2" and k == "CHECK"]
    assert len(checks) == 1
    assert all(source in checks[0] for source in SOURCE_TYPES)
    assert set(defaults) >= {
        "importance_score",
        "memory_tier",
        "access_count",
        "namespace",
        "timestamp",
        "user_id",
    }
    assert "long_term" in str(defaults["memory_tier"])

    kg = read_only(v2.knowledge_graph_path)
    try:
        kg_kinds = {
            (str(t), str(k))
            for t, k in kg.execute(
                "SELECT table_name, constraint_type FROM duckdb_constraints()"
            ).fetchall()
        }
    finally:
        kg.close()
    assert ("kg_entities", "PRIMARY KEY") in kg_kinds
    assert ("kg_relationships", "PRIMARY KEY") in kg_kinds


def test_counts_match(v2: SampleInfo) -> None:
    expected = {
        "conversations_v2": 205,
        "reflections_v2": 52,
        "kg_entities": 40,
        "kg_relationships": 60,
    }
    for table, count in expected.items():
        assert v2.row_counts[table] == count
    for table in ("conversations_v2", "reflections_v2", "reflection_tags", "session_links"):
        assert scalar(v2.reflection_path, f"SELECT count(*) FROM {table}") == v2.row_counts[table]
    for table in ("kg_entities", "kg_relationships"):
        assert scalar(v2.knowledge_graph_path, f"SELECT count(*) FROM {table}") == expected[table]
    assert v2.wal_row_counts["conversations_v2"] == 5
    assert v2.wal_row_counts["reflections_v2"] == 2
    assert len(v2.wal_conversation_ids) == 5
    assert v2.wal_rows == sum(v2.wal_row_counts.values())


def test_wal_rows_live_only_in_the_wal(v2: SampleInfo, tmp_path: Path) -> None:
    wal = v2.reflection_wal_path
    assert wal.name == "reflection.duckdb.wal"
    assert wal.is_file()
    assert wal.stat().st_size > 0

    ids = "', '".join(v2.wal_conversation_ids)
    in_db = f"SELECT count(*) FROM conversations_v2 WHERE id IN ('{ids}')"
    # Opening the database (file + WAL) shows the WAL rows ...
    assert scalar(v2.reflection_path, in_db) == 5
    # ... and a read-only look leaves the WAL in place.
    assert wal.is_file()
    assert wal.stat().st_size > 0

    # Copying only the database file silently drops them.
    alone = tmp_path / "reflection.duckdb"
    shutil.copyfile(v2.reflection_path, alone)
    assert scalar(alone, in_db) == 0
    assert scalar(alone, "SELECT count(*) FROM conversations_v2") == 200
    assert scalar(alone, "SELECT count(*) FROM reflections_v2") == 50

    # The database file plus its WAL carry everything.
    shutil.copyfile(wal, tmp_path / "reflection.duckdb.wal")
    assert scalar(alone, "SELECT count(*) FROM conversations_v2") == 205


def test_content_is_realistic(v2: SampleInfo) -> None:
    con = read_only(v2.reflection_path)
    try:
        lengths = con.execute(
            "SELECT min(strlen(content)), max(strlen(content)), count(DISTINCT content), "
            "count(DISTINCT project), count(DISTINCT session_id), count(DISTINCT category) "
            "FROM conversations_v2"
        ).fetchone()
        norms = con.execute(
            "SELECT min(list_dot_product(embedding, embedding)), "
            "max(list_dot_product(embedding, embedding)), count(embedding) "
            "FROM conversations_v2"
        ).fetchone()
        sources = {
            r[0]
            for r in con.execute("SELECT DISTINCT source_type FROM conversations_v2").fetchall()
        }
        span = con.execute("SELECT min(timestamp), max(timestamp) FROM conversations_v2").fetchone()
        dangling = con.execute(
            "SELECT count(*) FROM conversations_v2 c WHERE turn_parent_id IS NOT NULL "
            "AND turn_parent_id NOT IN (SELECT id FROM conversations_v2)"
        ).fetchone()
        fingerprints = con.execute(
            "SELECT count(*) FROM reflections_v2 WHERE octet_length(fingerprint) = 32"
        ).fetchone()
    finally:
        con.close()
    assert lengths is not None
    assert norms is not None
    assert span is not None
    assert lengths[0] >= 100
    assert lengths[1] <= 3000
    assert lengths[2] == 205
    assert lengths[3] >= 5
    assert lengths[4] >= 20
    assert lengths[5] >= 4
    assert norms[0] == pytest.approx(1.0, abs=1e-4)
    assert norms[1] == pytest.approx(1.0, abs=1e-4)
    assert norms[2] == 205
    assert sources - {None} <= set(SOURCE_TYPES)
    assert len(sources - {None}) >= 3
    assert SAMPLE_EPOCH - timedelta(weeks=6) <= span[0] < span[1]
    assert span[1] - span[0] > timedelta(weeks=2)
    assert dangling == (0,)
    assert fingerprints == (52,)

    kg = read_only(v2.knowledge_graph_path)
    try:
        with_embedding, without = kg.execute(
            "SELECT count(embedding), count(*) - count(embedding) FROM kg_entities"
        ).fetchone() or (0, 0)
        orphans = kg.execute(
            "SELECT count(*) FROM kg_relationships r "
            "WHERE from_entity NOT IN (SELECT id FROM kg_entities) "
            "OR to_entity NOT IN (SELECT id FROM kg_entities)"
        ).fetchone()
    finally:
        kg.close()
    assert with_embedding > 0
    assert without > 0
    assert orphans == (0,)


def _dump(info: SampleInfo) -> list[object]:
    con = read_only(info.reflection_path)
    try:
        rows: list[object] = [*con.execute("SELECT * FROM conversations_v2 ORDER BY id").fetchall()]
        rows += con.execute("SELECT * FROM reflections_v2 ORDER BY id").fetchall()
    finally:
        con.close()
    kg = read_only(info.knowledge_graph_path)
    try:
        rows += kg.execute("SELECT * FROM kg_entities ORDER BY id").fetchall()
        rows += kg.execute("SELECT * FROM kg_relationships ORDER BY id").fetchall()
    finally:
        kg.close()
    return rows


def test_deterministic_by_seed(tmp_path: Path) -> None:
    def small(name: str, seed: int) -> SampleInfo:
        return create_sample_databases(
            tmp_path / name, seed=seed, conversations=30, reflections=6, entities=8, relations=10
        )

    a, b, c = small("a", 7), small("b", 7), small("c", 8)
    assert _dump(a) == _dump(b)
    assert _dump(a) != _dump(c)
    assert a.wal_conversation_ids == b.wal_conversation_ids


def test_legacy_mode(tmp_path: Path) -> None:
    info = create_sample_databases(tmp_path / "old", legacy=True, conversations=40, reflections=8)
    assert info.legacy
    assert info.conversations_table == "conversations"
    assert info.reflections_table == "reflections"
    names = tables(info.reflection_path)
    assert {"conversations", "reflections"} <= names
    assert {"conversations_v2", "reflections_v2"}.isdisjoint(names)
    assert columns(info.reflection_path, "conversations") == LEGACY_CONVERSATIONS
    assert columns(info.reflection_path, "reflections") == LEGACY_REFLECTIONS
    assert info.row_counts["conversations"] == 45
    assert info.row_counts["reflections"] == 10
    assert info.wal_row_counts["conversations"] == 5
    assert info.reflection_wal_path.stat().st_size > 0
    assert scalar(info.reflection_path, "SELECT count(*) FROM conversations") == 45
    assert scalar(info.reflection_path, "SELECT min(json_valid(metadata)) FROM conversations")


def test_add_conversations_stays_in_the_wal(tmp_path: Path) -> None:
    info = create_sample_databases(tmp_path / "d", conversations=20, wal_conversations=0)
    assert not info.reflection_wal_path.exists()
    size_before = info.reflection_path.stat().st_size

    first = add_conversations(info.data_dir, 4, seed=1)
    assert len(set(first)) == 4
    wal_size = info.reflection_wal_path.stat().st_size
    assert wal_size > 0
    assert scalar(info.reflection_path, "SELECT count(*) FROM conversations_v2") == 24

    # the same seed again still gives new rows; the WAL keeps growing
    second = add_conversations(info.data_dir, 3, seed=1)
    assert set(first).isdisjoint(second)
    assert info.reflection_wal_path.stat().st_size > wal_size
    assert scalar(info.reflection_path, "SELECT count(*) FROM conversations_v2") == 27
    newest = scalar(
        info.reflection_path,
        "SELECT id FROM conversations_v2 ORDER BY timestamp DESC, id LIMIT 1",
    )
    assert newest in second

    # the database file itself is untouched until a checkpoint
    alone = tmp_path / "copy.duckdb"
    shutil.copyfile(info.reflection_path, alone)
    assert scalar(alone, "SELECT count(*) FROM conversations_v2") == 20
    assert info.reflection_path.stat().st_size == size_before

    third = add_conversations(info.data_dir, 2, seed=2, checkpoint=True)
    assert len(third) == 2
    assert not info.reflection_wal_path.exists()
    assert scalar(info.reflection_path, "SELECT count(*) FROM conversations_v2") == 29


def test_add_conversations_legacy(tmp_path: Path) -> None:
    info = create_sample_databases(tmp_path / "l", legacy=True, conversations=10)
    ids = add_conversations(info.data_dir, 3, seed=5)
    assert len(ids) == 3
    assert scalar(info.reflection_path, "SELECT count(*) FROM conversations") == 18
    assert info.reflection_wal_path.stat().st_size > 0


def test_existing_files_are_not_replaced_by_default(tmp_path: Path) -> None:
    def small(overwrite: bool = False) -> SampleInfo:
        return create_sample_databases(
            tmp_path / "x", conversations=5, reflections=1, entities=3, overwrite=overwrite
        )

    small()
    with pytest.raises(FileExistsError):
        small()
    again = small(overwrite=True)
    assert again.row_counts["conversations_v2"] == 10
    with pytest.raises(ValueError, match="conversations"):
        create_sample_databases(tmp_path / "y", conversations=-1)
    with pytest.raises(FileNotFoundError):
        add_conversations(tmp_path / "nothing-here", 1, seed=0)


def test_grow_to_size_small_target(tmp_path: Path) -> None:
    target_mb = 5.0
    info = grow_to_size(tmp_path / "big", target_mb, target_mb, seed=1)
    for path in (info.reflection_path, info.knowledge_graph_path):
        size_mb = path.stat().st_size / (1024 * 1024)
        assert target_mb * 0.8 <= size_mb <= target_mb * 1.2, (path.name, size_mb)
    assert sorted(p.name for p in info.data_dir.iterdir()) == [
        "knowledge_graph.duckdb",
        "reflection.duckdb",
        "reflection.duckdb.wal",
    ]
    assert info.reflection_wal_path.stat().st_size > 0
    assert info.wal_row_counts["conversations_v2"] == 5
    assert info.row_counts["conversations_v2"] > 300
    assert info.row_counts["kg_entities"] > 300

    con = read_only(info.reflection_path)
    try:
        norms = con.execute(
            "SELECT min(list_dot_product(embedding, embedding)), "
            "max(list_dot_product(embedding, embedding)), "
            "count(DISTINCT content), count(*) FROM conversations_v2"
        ).fetchone()
        bad_source = con.execute(
            "SELECT count(*) FROM conversations_v2 WHERE source_type NOT IN "
            "('claude_code','crackerjack','mahavishnu_workflow','manual','migration')"
        ).fetchone()
    finally:
        con.close()
    assert norms is not None
    assert norms[0] == pytest.approx(1.0, abs=1e-4)
    assert norms[1] == pytest.approx(1.0, abs=1e-4)
    assert norms[2] == norms[3]
    assert bad_source == (0,)

    kg = read_only(info.knowledge_graph_path)
    try:
        orphans = kg.execute(
            "SELECT count(*) FROM kg_relationships "
            "WHERE from_entity NOT IN (SELECT id FROM kg_entities) "
            "OR to_entity NOT IN (SELECT id FROM kg_entities)"
        ).fetchone()
        nulls = kg.execute(
            "SELECT count(*) - count(embedding), count(embedding) FROM kg_entities"
        ).fetchone()
    finally:
        kg.close()
    assert orphans == (0,)
    assert nulls is not None
    assert nulls[0] > 0
    assert nulls[1] > 0
