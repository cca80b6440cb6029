"""Pure logic of an upload: ids, layout, manifest and Akosha's rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from akosha_sync.repository.manifest import (
    FileEntry,
    akosha_manifest_problems,
    build_manifest,
    decode_manifest,
    encode_manifest,
    make_upload_id,
    manifest_checksum,
    object_key,
    upload_id_order,
)

NOW = datetime(2025, 2, 8, 14, 30, 52, tzinfo=UTC)


def _entry(name: str, *, compression: str | None = "zstd") -> FileEntry:
    return FileEntry(
        key=f"systems/mac/uploads/u/{name}", original_size=100, stored_size=60,
        sha256="a" * 64, stored_sha256="b" * 64, compression=compression,
    )


def test_upload_id_format_and_suffix() -> None:
    assert make_upload_id("mac", NOW) == "20250208_143052_mac"
    assert make_upload_id("mac", NOW, 1) == "20250208_143052_mac.2"
    # Local times are converted to UTC.
    plus2 = NOW.astimezone(__import__("datetime").timezone(timedelta(hours=2)))
    assert make_upload_id("mac", plus2) == "20250208_143052_mac"


def test_upload_ids_sort_in_time_order() -> None:
    ids = [make_upload_id("mac", NOW, n) for n in range(12)]
    later = make_upload_id("mac", NOW + timedelta(seconds=1))
    shuffled = [ids[10], later, ids[9], ids[0], ids[11], ids[1], *ids[2:9]]
    assert sorted(shuffled, key=upload_id_order) == [*ids, later]


def test_key_layout_matches_the_seed() -> None:
    assert (
        object_key("reflection.duckdb", "20250208_143052_mac", "mac")
        == "systems/mac/uploads/20250208_143052_mac/reflection.duckdb"
    )


def test_manifest_fields_and_checksum() -> None:
    files = {"reflection.duckdb": _entry("reflection.duckdb"),
             "memories.json": _entry("memories.json", compression=None)}
    m = build_manifest(system_id="mac", upload_id="20250208_143052_mac", uploaded_at=NOW,
                       files=files, conversation_count=12)
    data = msgspec.json.decode(encode_manifest(m))
    assert data["files"] == ["memories.json", "reflection.duckdb"]
    assert data["compressed"] is True and data["compression_format"] == "zstd"
    assert data["total_size_bytes"] == 120
    assert data["uploaded_at"] == "2025-02-08T14:30:52Z" == data["timestamp"]
    assert data["file_details"]["reflection.duckdb"]["sha256"] == "a" * 64
    assert akosha_manifest_problems(data, now=NOW) == []
    # The checksum covers everything but itself, and a change breaks it.
    decoded = decode_manifest(encode_manifest(m))
    assert manifest_checksum(decoded) == data["checksum"]
    decoded.conversation_count = 13
    assert manifest_checksum(decoded) != data["checksum"]


def test_uncompressed_manifest_has_no_format_and_count_is_capped() -> None:
    m = build_manifest(system_id="mac", upload_id="u", uploaded_at=NOW,
                       files={"r.duckdb": _entry("r.duckdb", compression=None)},
                       conversation_count=5_000_000)
    data = msgspec.json.decode(encode_manifest(m))
    assert data["compressed"] is False and "compression_format" not in data
    assert data["version"] == "1.0" and data["system_type"] == "session-buddy"
    assert data["conversation_count"] == 1_000_000
    assert akosha_manifest_problems(data, now=NOW) == []


def test_akosha_rules_catch_violations() -> None:
    bad = {
        "uploaded_at": (NOW - timedelta(days=400)).isoformat(),
        "conversation_count": -1,
        "version": "v1",
        "checksum": "XYZ",
        "compressed": True,
        "files": ["dir/file.duckdb", {"name": "x"}],
        "system_id": "a.b",
    }
    problems = akosha_manifest_problems(bad, now=NOW)
    assert len(problems) == 8, problems
