"""The blocks layout as a sync writes it, against a real SeaweedFS checked with minio:
pieces are stored once, a small change sends only new pieces, reused packs are
checked against the bucket, and a writer in another process never yields a mixed
snapshot."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import duckdb
import msgspec
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.manifest import akosha_manifest_problems
from akosha_sync.repository.manifest import upload_id_order as upload_order
from akosha_sync.repository.restore import restore
from akosha_sync.repository.store import make_store
from akosha_sync.sample import SampleInfo, add_conversations, grow_to_size
from akosha_sync.sync.cloud import CloudSyncMethod
from akosha_sync.sync.protocol import CloudUploadError
from support import faults
from support.verify import get_object

MakeConfig = Callable[..., AkoshaSyncConfig]


def _sync(config: AkoshaSyncConfig) -> dict[str, Any]:
    result: dict[str, Any] = anyio.run(CloudSyncMethod(config).sync)
    assert result["success"], result["error"]
    return result


def _json(client: Minio, bucket: str, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(get_object(client, bucket, key))
    return data


def _packs(client: Minio, bucket: str) -> dict[str, int]:
    return {
        str(o.object_name): int(o.size or 0)
        for o in client.list_objects(bucket, prefix="systems/test-host/packs/", recursive=True)
    }


def test_manifest_records_the_blocks_fields_and_passes_akoshas_check(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    akosha_python: Path, tmp_path: Path,
) -> None:
    result = _sync(s3_config())
    manifest = _json(minio_client, s3_bucket, result["manifest_key"])
    assert akosha_manifest_problems(manifest) == []
    uid = result["upload_id"]
    assert manifest["storage_layout"] == "blocks"
    assert manifest["index"] == f"systems/test-host/uploads/{uid}/index.json"
    packs = _packs(minio_client, s3_bucket)
    memories = len(get_object(minio_client, s3_bucket, manifest["file_details"]["memories.json"][
        "key"]))
    index_size = len(get_object(minio_client, s3_bucket, manifest["index"]))
    assert manifest["bytes_new"] == sum(packs.values()) + index_size + memories
    db = manifest["file_details"]["reflection.duckdb"]
    assert db["row_counts"] == {t: sample.row_counts[t] for t in db["row_counts"]}
    assert set(db["row_counts"]) >= {"conversations_v2", "reflections_v2"}
    assert db["wal"] == "reflection.duckdb.wal" and db["pieces"] == db["new_pieces"] > 1
    kg = manifest["file_details"]["knowledge_graph.duckdb"]
    assert set(kg["row_counts"]) == {"kg_entities", "kg_relationships"}
    assert manifest["file_details"]["reflection.duckdb.wal"]["row_counts"] is None
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    check = ("import json, sys\nfrom akosha.models.schemas import SystemMemoryUploadManifest "
             "as M\nM.model_validate(json.load(open(sys.argv[1])))\n")
    out = subprocess.run([str(akosha_python), "-c", check, str(path)], capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def test_pieces_are_stored_once_across_uploads_and_databases(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
    sample: SampleInfo,
) -> None:
    # The knowledge graph is a byte copy of the reflection database: it adds no piece.
    data = tmp_path / "twins"
    data.mkdir()
    shutil.copyfile(sample.reflection_path, data / "reflection.duckdb")
    shutil.copyfile(sample.reflection_path, data / "knowledge_graph.duckdb")
    config = s3_config(data_dir=str(data), export_memories=False)
    first = _sync(config)
    manifest = _json(minio_client, s3_bucket, first["manifest_key"])
    details = manifest["file_details"]
    assert details["reflection.duckdb"]["new_pieces"] == details["reflection.duckdb"]["pieces"]
    assert details["knowledge_graph.duckdb"]["new_pieces"] == 0
    index = _json(minio_client, s3_bucket, manifest["index"])
    files = index["files"]
    assert files["knowledge_graph.duckdb"]["pieces"] == files["reflection.duckdb"]["pieces"]
    stored = {tuple(p[:4]) for p in files["reflection.duckdb"]["pieces"]}
    assert sum(p[3] for p in stored) == sum(_packs(minio_client, s3_bucket).values())

    # Across uploads, even with the local state gone: nothing is stored again.
    shutil.rmtree(config.state_path)
    before = _packs(minio_client, s3_bucket)
    second = _sync(config)
    assert _packs(minio_client, s3_bucket) == before
    again = _json(minio_client, s3_bucket, second["manifest_key"])
    assert again["bytes_new"] == len(get_object(minio_client, s3_bucket, again["index"]))
    assert sorted(second["files_unchanged"]) == ["knowledge_graph.duckdb", "reflection.duckdb"]
    assert _json(minio_client, s3_bucket, again["index"])["files"] == files


def test_a_small_change_sends_only_the_new_pieces(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    config = s3_config(export_memories=False)
    first = _sync(config)
    old = _json(minio_client, s3_bucket, _json(minio_client, s3_bucket, first["manifest_key"])[
        "index"])
    old_ids = {p[0] for f in old["files"].values() for p in f["pieces"]}
    packs_before = _packs(minio_client, s3_bucket)

    add_conversations(sample.data_dir, 3, seed=7, checkpoint=True)
    second = _sync(config)
    manifest = _json(minio_client, s3_bucket, second["manifest_key"])
    new = _json(minio_client, s3_bucket, manifest["index"])
    pieces = new["files"]["reflection.duckdb"]["pieces"]
    fresh = {p[0]: p for p in pieces if p[0] not in old_ids}
    assert 0 < len(fresh) < len(pieces)
    assert manifest["file_details"]["reflection.duckdb"]["new_pieces"] == len(fresh)
    # Exactly the new pieces went, in new packs; the old pieces keep their old packs.
    new_packs = {k: v for k, v in _packs(minio_client, s3_bucket).items()
                 if k not in packs_before}
    assert sum(new_packs.values()) == sum(p[3] for p in fresh.values())
    assert manifest["bytes_new"] == sum(new_packs.values()) + len(
        get_object(minio_client, s3_bucket, manifest["index"]))
    assert second["bytes_transferred"] < first["bytes_transferred"] / 2
    assert "knowledge_graph.duckdb" in second["files_unchanged"]


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_a_sync_of_one_database_keeps_the_other_in_its_upload(
    layout: str, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    sample: SampleInfo, tmp_path: Path,
) -> None:
    """``upload_knowledge_graph=False``: the upload still holds the whole memory, the
    knowledge graph at the version the last upload stored. Before, it held the
    reflections alone: ``restore latest`` brought half the memory back, retention could
    forget the last upload with the knowledge graph, and the next full sync stored the
    whole knowledge graph again (the last upload had none of its pieces)."""
    config = s3_config(export_memories=False, storage_layout=layout)
    first = _sync(config)
    kg = sample.knowledge_graph_path.read_bytes()
    add_conversations(sample.data_dir, 3, seed=7, checkpoint=True)
    part: dict[str, Any] = anyio.run(
        lambda: CloudSyncMethod(config).sync(upload_knowledge_graph=False))
    assert part["success"] and part["error"] is None, part["error"]
    assert not [k for k in part["files_uploaded"] if "knowledge_graph" in k]
    manifest = _json(minio_client, s3_bucket, part["manifest_key"])
    assert "knowledge_graph.duckdb" in manifest["files"]
    assert manifest["metadata"]["not_selected"] == ["knowledge_graph.duckdb"]
    assert manifest["metadata"]["carried_over"]["knowledge_graph.duckdb"] == first["upload_id"]

    target = tmp_path / "back"
    anyio.run(lambda: restore(make_store(config), config, system_id="test-host", target=target))
    assert (target / "knowledge_graph.duckdb").read_bytes() == kg
    assert (target / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()

    # The next full sync reads the knowledge graph again (touched) and stores none of it.
    packs = _packs(minio_client, s3_bucket)
    objects_before = set(faults.objects(minio_client, s3_bucket))
    sample.knowledge_graph_path.touch()
    full = _sync(config)
    assert "knowledge_graph.duckdb" in full["files_unchanged"]
    assert _packs(minio_client, s3_bucket) == packs
    added = set(faults.objects(minio_client, s3_bucket)) - objects_before
    assert not [k for k in added if "knowledge_graph" in k], added


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_a_database_kept_from_an_earlier_upload_keeps_its_own_wal_only(
    layout: str, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    sample: SampleInfo, tmp_path: Path,
) -> None:
    """Upload 1 has a WAL, a checkpoint removes it, upload 2 has none; upload 3 keeps
    the reflections from upload 2. Before (files layout), it took upload 1's WAL from
    the local state too, and restored a database DuckDB refuses to open."""
    config = s3_config(export_memories=False, storage_layout=layout)
    wal = Path(f"{sample.reflection_path}.wal")
    assert wal.exists()
    _sync(config)
    add_conversations(sample.data_dir, 5, seed=3, checkpoint=True)
    assert not wal.exists()
    _sync(config)
    third: dict[str, Any] = anyio.run(
        lambda: CloudSyncMethod(config).sync(upload_reflections=False))
    assert third["success"], third["error"]
    manifest = _json(minio_client, s3_bucket, third["manifest_key"])
    assert "reflection.duckdb.wal" not in manifest["files"], manifest["files"]
    target = tmp_path / "back"
    anyio.run(lambda: restore(make_store(config), config, system_id="test-host", target=target))
    assert sorted(p.name for p in target.iterdir()) == [
        "knowledge_graph.duckdb", "reflection.duckdb"]
    duckdb.connect(str(target / "reflection.duckdb"), read_only=True).close()


def test_files_layout_commits_nothing_when_a_reused_object_left_during_the_sync(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """The second upload reuses the knowledge graph's object from the first; it is gone
    by the time of the commit (a prune, say). Before, the manifest named it anyway."""
    config = s3_config(export_memories=False, storage_layout="files")
    first = _sync(config)
    reused = f"systems/test-host/uploads/{first['upload_id']}/knowledge_graph.duckdb"
    minio_client.stat_object(s3_bucket, reused)
    add_conversations(sample.data_dir, 2, seed=4, checkpoint=True)

    def at_commit(phase: str, done: int, total: int) -> None:
        if phase == "manifest":
            minio_client.remove_object(s3_bucket, reused)

    with pytest.raises(CloudUploadError, match="left the bucket during the sync"):
        anyio.run(lambda: CloudSyncMethod(config).sync(progress=at_commit))
    assert [k for k in faults.objects(minio_client, s3_bucket)
            if k.endswith("manifest.json")] == [first["manifest_key"]]


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_records_added_while_the_export_was_off_go_out_when_it_is_on_again(
    layout: str, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    sample: SampleInfo,
) -> None:
    """Before, the sync with the export off saved the databases' new fingerprints, so
    the next one with the export on took them as unchanged and never rendered the
    records added meanwhile: Akosha never got them."""
    on = s3_config(storage_layout=layout)
    off = msgspec.structs.replace(on, export_memories=False)
    _sync(on)
    added = add_conversations(sample.data_dir, 3, seed=11, checkpoint=True)
    _sync(off)
    third = _sync(on)
    manifest = _json(minio_client, s3_bucket, third["manifest_key"])
    memories = json.loads(get_object(
        minio_client, s3_bucket, manifest["file_details"]["memories.json"]["key"]))
    sent = {c["id"].rsplit(":", 1)[-1] for c in memories["conversations"]}  # sid:kind:id
    assert set(added) <= sent, sorted(set(added) - sent)


@pytest.mark.parametrize("wanted", ["reflections only", "unreadable graph"])
def test_with_deduplication_off_a_database_not_read_is_still_kept(
    wanted: str, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    sample: SampleInfo, tmp_path: Path,
) -> None:
    """Blocks layout, ``enable_deduplication = false``: every piece read is stored again,
    and a database not read (not asked for, or unreadable) is still kept at its last
    version. Before, it was left out of the upload, which reported success."""
    config = s3_config(export_memories=False)
    _sync(config)
    kg = sample.knowledge_graph_path.read_bytes()
    plain = msgspec.structs.replace(config, enable_deduplication=False)
    if wanted == "reflections only":
        result: dict[str, Any] = anyio.run(
            lambda: CloudSyncMethod(plain).sync(upload_knowledge_graph=False))
    else:
        sample.knowledge_graph_path.write_bytes(b"not a database" * 100)
        result = anyio.run(CloudSyncMethod(plain).sync)
    manifest = _json(minio_client, s3_bucket, result["manifest_key"])
    assert "knowledge_graph.duckdb" in manifest["files"], manifest["files"]
    assert manifest["file_details"]["reflection.duckdb"]["new_pieces"] == (
        manifest["file_details"]["reflection.duckdb"]["pieces"])  # stored anew
    target = tmp_path / "back"
    anyio.run(lambda: restore(make_store(config), config, system_id="test-host", target=target))
    assert (target / "knowledge_graph.duckdb").read_bytes() == kg


def test_after_the_last_upload_is_forgotten_the_next_reuses_an_earlier_ones_pieces(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """``forget`` the newest upload (a damaged one, say), then sync: before, nothing was
    known any more and every piece was stored again. And the database as it is now (as
    the forgotten upload had it) is what the new upload holds, not the earlier version."""
    from akosha_sync.repository.forget import forget
    from akosha_sync.repository.retention import Policy

    config = s3_config(export_memories=False)
    _sync(config)
    add_conversations(sample.data_dir, 3, seed=12, checkpoint=True)
    second = _sync(config)
    store = make_store(config)
    anyio.run(lambda: forget(store, "test-host", Policy(), dry_run=False,
                             upload_ids=[second["upload_id"]]))
    third = _sync(config)  # nothing changed since the forgotten upload
    manifest = _json(minio_client, s3_bucket, third["manifest_key"])
    details = manifest["file_details"]
    assert details["knowledge_graph.duckdb"]["new_pieces"] == 0
    assert 0 < details["reflection.duckdb"]["new_pieces"] < details["reflection.duckdb"][
        "pieces"]  # only the pieces the forgotten upload had added
    target = tmp_path / "back"
    anyio.run(lambda: restore(store, config, system_id="test-host", target=target))
    assert (target / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()


def test_a_database_back_after_a_sync_without_it_reuses_its_earlier_pieces(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """The knowledge graph is away for one sync (a moved folder, a disk not mounted),
    then back: before, all of it was stored again, the last upload having none of it."""
    config = s3_config(export_memories=False)
    _sync(config)
    away = tmp_path / "away.duckdb"
    sample.knowledge_graph_path.rename(away)
    without = _sync(config)
    assert "knowledge_graph.duckdb" in without["files_missing"]
    away.rename(sample.knowledge_graph_path)
    back = _sync(config)
    details = _json(minio_client, s3_bucket, back["manifest_key"])["file_details"]
    assert details["knowledge_graph.duckdb"]["new_pieces"] == 0


def test_reused_pack_missing_from_the_bucket_is_stored_again(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """Local state says everything is stored; the bucket disagrees and wins."""
    config = s3_config(export_memories=False)
    first = _sync(config)
    index = _json(minio_client, s3_bucket, _json(minio_client, s3_bucket, first["manifest_key"])[
        "index"])
    lost = next(iter(index["packs"].values()))["key"]
    minio_client.remove_object(s3_bucket, lost)
    second = _sync(config)
    new_index = _json(minio_client, s3_bucket, _json(
        minio_client, s3_bucket, second["manifest_key"])["index"])
    # Its pieces were stored again (same pieces, same order: the same content-addressed pack).
    assert lost in second["files_uploaded"]
    for ref in new_index["packs"].values():
        minio_client.stat_object(s3_bucket, ref["key"])
    target = tmp_path / "back"
    anyio.run(lambda: restore(make_store(config), config, system_id="test-host", target=target))
    assert (target / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()


def _poll(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


_WRITER = textwrap.dedent("""
    import os, random, sys, time, duckdb
    path, stop, done = sys.argv[1], sys.argv[2], sys.argv[3]
    rng = random.Random(1)
    n = 0
    while not os.path.exists(stop):
        try:
            con = duckdb.connect(path)
        except duckdb.IOException as exc:  # our sync holds the shared lock: try again
            if "lock" not in str(exc).lower():
                raise
            time.sleep(0.002)
            continue
        try:
            if n % 3 == 2:  # leave some rows only in the WAL
                con.execute("PRAGMA disable_checkpoint_on_shutdown")
            for _ in range(2):
                rows = [(f"w{n}-{i}", "x" * rng.randint(50, 2000), "writer",
                         [rng.random() for _ in range(384)]) for i in range(20)]
                con.executemany(
                    "INSERT INTO conversations_v2 (id, content, category, embedding) "
                    "VALUES (?, ?, ?, ?)", rows)
                # Rewrites many blocks at each checkpoint, so freed blocks get reused.
                con.execute("UPDATE conversations_v2 SET access_count = access_count + 1 "
                            "WHERE hash(id) % 4 = ?", [n % 4])
                n += 1
                con.execute("CHECKPOINT")
                with open(done + ".tmp", "w") as fh:  # tell the test: one more checkpoint
                    fh.write(str(n))
                os.replace(done + ".tmp", done)
        finally:
            con.close()
        time.sleep(0.1)  # between sessions the database is closed, as Session-Buddy's is
    print(n, flush=True)
""")


def test_a_writer_process_never_yields_a_mixed_snapshot(
    s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Another process inserts and checkpoints in a loop during the syncs; every upload
    restores to a database DuckDB opens, with a row count between before and after."""
    data = grow_to_size(tmp_path / "big", 8, 1)
    config = s3_config(export_memories=False, data_dir=str(data.data_dir))
    db = data.reflection_path

    def count(path: Path) -> int:
        con = duckdb.connect(str(path), read_only=True)
        try:
            row = con.execute("SELECT count(*) FROM conversations_v2").fetchone()
            return int(row[0]) if row else -1
        finally:
            con.close()

    before = count(db)
    stop, done = tmp_path / "stop", tmp_path / "checkpoints"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(db), str(stop), str(done)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def checkpoints() -> int:
        try:
            return int(done.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def writer_waits(phase: str, read: int, total: int, advanced: list[bool]) -> None:
        """Probe at the progress seam: once per sync, in the middle of reading the
        database, give the writer up to 1 s to checkpoint. While we read under the lock
        it cannot; a copy being read may change underneath freely."""
        if phase == "upload:reflection.duckdb" and read > 12288 and not advanced:
            start, deadline = checkpoints(), time.monotonic() + 1.0
            while checkpoints() == start and time.monotonic() < deadline:
                time.sleep(0.01)
            advanced.append(checkpoints() != start)

    results: list[dict[str, Any]] = []
    try:
        assert _poll(lambda: checkpoints() > 0), "the writer never checkpointed"
        for _ in range(4):
            advanced: list[bool] = []
            result = anyio.run(lambda a=advanced: CloudSyncMethod(config).sync(
                progress=lambda p, d, t: writer_waits(p, d, t, a)))
            results.append(result)
            if result["details"].get("snapshots", {}).get("reflection.duckdb") == "locked":
                assert advanced == [False], "the writer checkpointed while we held the lock"
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err[-2000:]
    assert int(out.strip()) > 0  # the writer really wrote during the syncs
    after = count(db)
    assert after > before
    seen: set[int] = set()
    for i, result in enumerate(results):
        manifest = _json(minio_client, s3_bucket, result["manifest_key"])
        if "reflection.duckdb" not in manifest["file_details"]:
            continue  # that sync could not take a snapshot; it says so in its error
        target = tmp_path / f"restored-{i}"
        anyio.run(lambda r=result, t=target: restore(
            make_store(config), config, system_id="test-host", target=t,
            upload_id=r["upload_id"]))
        rows = count(target / "reflection.duckdb")
        assert before <= rows <= after, (i, before, rows, after)
        assert rows == manifest["file_details"]["reflection.duckdb"]["row_counts"][
            "conversations_v2"]
        restored = (target / "reflection.duckdb").read_bytes()
        assert hashlib.sha256(restored).hexdigest() == manifest["file_details"][
            "reflection.duckdb"]["sha256"]
        seen.add(rows)
    assert len(seen) >= 2, "the uploads did not see the writer's progress"


def test_a_large_memories_json_streams_as_multipart_and_is_whole(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """memories.json is rendered straight into a multipart upload (no file on disk):
    read back with minio it is one valid document holding every record, once, and
    its SHA-256 and size are the manifest's."""
    from akosha_sync.repository.store import MIN_PART_SIZE
    from akosha_sync.sync import memories

    monkeypatch.setattr(memories, "_PART_BYTES", MIN_PART_SIZE)  # several parts
    data = grow_to_size(tmp_path / "big", 8, 4)
    config = s3_config(data_dir=str(data.data_dir))
    result = _sync(config)
    manifest = _json(minio_client, s3_bucket, result["manifest_key"])
    detail = manifest["file_details"]["memories.json"]
    body = get_object(minio_client, s3_bucket, detail["key"])
    assert len(body) > 2 * MIN_PART_SIZE  # really a multipart upload
    assert len(body) == detail["original_size"] == detail["stored_size"]
    assert hashlib.sha256(body).hexdigest() == detail["sha256"]
    doc = json.loads(body)
    ids = [r["id"] for r in doc["conversations"]]
    assert len(ids) == len(set(ids))
    kinds = {r["metadata"]["record_type"] for r in doc["conversations"]}
    assert kinds == {"conversation", "reflection", "entity"}
    con = duckdb.connect(str(data.reflection_path), read_only=True)
    try:
        row = con.execute(
            "SELECT count(*) FROM conversations_v2 WHERE embedding IS NOT NULL").fetchone()
    finally:
        con.close()
    assert row is not None
    assert sum(1 for r in doc["conversations"]
               if r["metadata"]["record_type"] == "conversation") == row[0]
    assert result["details"]["memories"]["conversation"] == row[0]
    # Nothing of the export is left on disk.
    assert not list(Path(config.state_path).rglob("memories.json"))


def test_a_slice_too_large_for_duckdbs_memory_cap_is_rendered_in_halves(
    sample: SampleInfo,
) -> None:
    """Long records under the export's memory cap split their slice instead of
    failing the sync: the same records come out either way."""
    from akosha_sync.sync import records

    def render(limit: str | None, batch: int) -> list[tuple[str, str]]:
        con = duckdb.connect(config={"memory_limit": limit} if limit else {})
        try:
            con.execute(f"ATTACH '{sample.reflection_path}' AS src (READ_ONLY)")
            con.execute("USE src")
            return list(records.iter_records(
                con, "conversation", system_id="s", shape="ingest", batch=batch))
        finally:
            con.close()

    expected = render(None, 500)
    calls: list[int] = []
    real = duckdb.DuckDBPyConnection.execute

    def execute(self: Any, sql: str, params: Any = None) -> Any:
        # The seam: DuckDB refuses any slice wider than 2 rows, as its cap would.
        if isinstance(params, dict) and "low" in params:
            calls.append(params["high"] - params["low"])
            if params["high"] - params["low"] > 2:
                raise duckdb.OutOfMemoryException("Out of Memory Error: injected")
        return real(self, sql, params)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(duckdb.DuckDBPyConnection, "execute", execute)
        got = render(None, 8)
    assert sorted(got) == sorted(expected) and got
    assert max(calls) == 8 and min(calls) <= 2


def test_a_record_too_large_for_the_cap_alone_is_rendered_under_a_raised_cap(
    sample: SampleInfo,
) -> None:
    """When even one record does not fit, the export raises DuckDB's cap once and
    renders it, rather than failing the sync."""
    from akosha_sync.repository.source import ROOMY_MEMORY_LIMIT
    from akosha_sync.sync import records

    con = duckdb.connect(config={"memory_limit": "24MB"})
    con.execute(f"ATTACH '{sample.reflection_path}' AS src (READ_ONLY)")
    con.execute("USE src")
    expected = list(records.iter_records(con, "conversation", system_id="s", shape="ingest"))
    real = duckdb.DuckDBPyConnection.execute
    sets: list[str] = []

    def execute(self: Any, sql: str, params: Any = None) -> Any:
        # The seam: DuckDB refuses every slice, even of one row, until the cap is raised.
        if sql.startswith("SET memory_limit"):
            sets.append(sql)
        elif isinstance(params, dict) and "low" in params and not sets:
            raise duckdb.OutOfMemoryException("Out of Memory Error: injected")
        return real(self, sql, params)

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(duckdb.DuckDBPyConnection, "execute", execute)
            got = list(records.iter_records(
                con, "conversation", system_id="s", shape="ingest", batch=4))
        assert sorted(got) == sorted(expected) and got
        assert len(sets) == 1  # raised once, for the rest of the export
        row = con.execute("SELECT current_setting('memory_limit')").fetchone()
        assert row is not None
        assert row[0] == real(
            duckdb.connect(config={"memory_limit": ROOMY_MEMORY_LIMIT}),
            "SELECT current_setting('memory_limit')",
        ).fetchone()[0]  # type: ignore[index]
    finally:
        con.close()


def test_a_wal_too_large_to_replay_under_the_cap_opens_under_a_raised_one(
    sample: SampleInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real WAL that DuckDB cannot replay under the cap (12 MB here, for an ~8 MB
    WAL) still opens: the snapshot is tried once more under the roomy cap."""
    from akosha_sync.repository import source

    data = tmp_path / "data"
    data.mkdir()
    for each in (sample.reflection_path, sample.reflection_wal_path):
        if each.exists():
            shutil.copy(each, data / each.name)
    add_conversations(data, 3000, seed=5, checkpoint=False)
    path = data / sample.reflection_path.name
    small = "12MB"
    probe = duckdb.connect(config={"memory_limit": small})
    with pytest.raises(duckdb.Error) as refused:  # the premise: the cap is too small
        probe.execute(f"ATTACH '{path}' AS src (READ_ONLY)")
    probe.close()
    assert source.is_out_of_memory(refused.value)

    monkeypatch.setattr(source, "MEMORY_LIMIT", small)
    with source.open_locked(path, tmp_path / "tmp") as held:
        before = sample.row_counts.get("conversations_v2", sample.row_counts.get("conversations"))
        assert before is not None and held.conversation_count == before + 3000


def test_a_failed_sync_never_deletes_a_pack_that_was_there_before_it(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Packs are named by their bytes: a sync that stores pieces again (deduplication
    off, or a pack it may not reuse) can write a pack identical to one that committed
    uploads use. Its clean-up after a failure deleted that pack with its own."""
    from akosha_sync.sync import blocks

    _sync(s3_config(export_memories=False))
    before = {k for k in faults.objects(minio_client, s3_bucket) if k.endswith(".pack")}

    def fail(index: Any) -> bytes:  # the fault, at the seam: after every pack is stored
        raise CloudUploadError("injected: the index could not be written")

    monkeypatch.setattr(blocks, "encode_index", fail)
    with pytest.raises(CloudUploadError, match="injected"):
        anyio.run(CloudSyncMethod(s3_config(export_memories=False,
                                            enable_deduplication=False)).sync)
    after = {k for k in faults.objects(minio_client, s3_bucket) if k.endswith(".pack")}
    assert before <= after, f"deleted: {sorted(before - after)}"
    assert faults.restore_problems(minio_client, s3_bucket) == []


def test_a_sync_during_prunes_sweep_never_writes_a_pack_under_a_condemned_key(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A sync that reads the prune plan stores the condemned pieces again. With the same
    data those were the very bytes of the condemned packs, so the same keys: a sweep
    that had listed the bucket just before deleted them under the sync's new upload
    (1 round in 40-60 of a prune/sync race, no patching)."""
    from akosha_sync.repository import prune as prune_module
    from akosha_sync.repository.forget import forget
    from akosha_sync.repository.retention import Policy

    config = s3_config(export_memories=False)
    first = _sync(config)
    condemned = set(_json(minio_client, s3_bucket, _json(
        minio_client, s3_bucket, first["manifest_key"])["index"])["packs"])
    store = make_store(config)
    anyio.run(lambda: forget(store, "test-host", Policy(), dry_run=False,
                             upload_ids=[first["upload_id"]]))
    results: list[dict[str, Any]] = []
    read_repo = prune_module._read_repo

    async def sweep_reads_then_a_sync_runs(store: Any, system_id: str) -> Any:
        repo = await read_repo(store, system_id)
        if prune_module.plan_key(system_id) in faults.objects(minio_client, s3_bucket):
            # The seam: the sweep has listed the bucket; a sync runs before it deletes.
            results.append(await CloudSyncMethod(config).sync())
        return repo

    monkeypatch.setattr(prune_module, "_read_repo", sweep_reads_then_a_sync_runs)
    report = anyio.run(lambda: prune_module.prune(store, "test-host", dry_run=False,
                                                  wait_seconds=0))
    (second,) = results
    assert second["success"], second["error"]
    index = _json(minio_client, s3_bucket, _json(
        minio_client, s3_bucket, second["manifest_key"])["index"])
    assert not set(index["packs"]) & condemned  # the same pieces, in packs of other names
    assert {index["packs"][p]["key"] for p in index["packs"]} <= set(_packs(
        minio_client, s3_bucket))
    assert {f"systems/test-host/packs/{p[:2]}/{p}.pack" for p in condemned} <= set(
        report.deleted)
    assert faults.restore_problems(minio_client, s3_bucket) == []
    target = tmp_path / "restored"
    anyio.run(lambda: restore(store, config, system_id="test-host", target=target,
                              upload_id=second["upload_id"]))
    for name in ("reflection.duckdb", "knowledge_graph.duckdb"):
        assert (target / name).read_bytes() == (sample.data_dir / name).read_bytes()


def test_a_sync_that_outlived_prunes_allowance_or_lost_its_claim_commits_nothing(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A laptop asleep mid-sync: its monotonic budget stood still while a prune elsewhere
    took the upload for abandoned (2 hours) and deleted its claim and packs; on waking
    it committed a manifest naming the deleted packs."""
    from akosha_sync.sync import cloud
    from akosha_sync.sync.upload import Upload

    config = s3_config(export_memories=False)
    real_claim = cloud.CloudSyncMethod._claim_once

    async def claimed_hours_ago(self: Any) -> Upload:  # the clock seam: the wall clock
        upload = await real_claim(self)
        upload.claimed_wall -= 3 * 3600
        return upload

    monkeypatch.setattr(cloud.CloudSyncMethod, "_claim_once", claimed_hours_ago)
    with pytest.raises(CloudUploadError, match=r"running for 180 minutes.*Nothing was committed"):
        anyio.run(CloudSyncMethod(config).sync)
    monkeypatch.undo()
    assert not [k for k in faults.objects(minio_client, s3_bucket) if k.endswith(".json")
                and "/uploads/" in k]  # nothing committed, its claim cleaned up

    real_encode = cloud.encode_manifest

    def prune_took_the_claim(manifest: Any) -> bytes:  # a prune ran just before the commit
        for key in faults.objects(minio_client, s3_bucket):
            if key.endswith("/_claim.json"):
                minio_client.remove_object(s3_bucket, key)
        return bytes(real_encode(manifest))

    monkeypatch.setattr(cloud, "encode_manifest", prune_took_the_claim)
    with pytest.raises(CloudUploadError, match=r"_claim.json is gone.*Nothing was committed"):
        anyio.run(CloudSyncMethod(config).sync)
    assert not [k for k in faults.objects(minio_client, s3_bucket)
                if k.endswith("/manifest.json")]


def test_a_machine_clock_ahead_of_the_stores_does_not_date_uploads_in_the_future(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """Retention keeps the newest upload: one dated 400 days ahead stayed the newest, and
    every real upload made meanwhile was forgotten (keep-last, keep-within)."""
    from datetime import UTC, datetime, timedelta

    config = s3_config(export_memories=False)
    ahead = timedelta(days=400)
    result = anyio.run(CloudSyncMethod(
        config, clock=lambda: datetime.now(UTC) + ahead).sync)
    assert result["success"], result["error"]
    named = datetime.strptime(result["upload_id"][:15], "%Y%m%d_%H%M%S").replace(tzinfo=UTC)
    assert abs(named - datetime.now(UTC)) < timedelta(minutes=10)
    future = (datetime.now(UTC) + ahead).strftime("%Y%m%d")
    assert not [k for k in faults.objects(minio_client, s3_bucket) if future in k]
    manifest = _json(minio_client, s3_bucket, result["manifest_key"])
    assert manifest["uploaded_at"][:4] == str(datetime.now(UTC).year)


def test_an_upload_after_the_clock_was_set_back_is_still_the_newest(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """A clock 5 minutes ahead (within what is tolerated) names an upload; NTP sets the
    clock right and the next sync, with 30 new conversations, runs. Before, it was named
    5 minutes earlier than the one before it, and `forget --keep-last 1` (what the
    daemon's retention runs after each sync) forgot it, the one with the new data."""
    from datetime import UTC, datetime, timedelta

    from akosha_sync.repository.forget import forget
    from akosha_sync.repository.retention import Policy

    config = s3_config(export_memories=False)
    ahead = anyio.run(CloudSyncMethod(
        config, clock=lambda: datetime.now(UTC) + timedelta(minutes=5)).sync)
    add_conversations(sample.data_dir, 30, seed=5, checkpoint=True)
    later = _sync(config)
    assert upload_order(later["upload_id"]) > upload_order(ahead["upload_id"])
    report = anyio.run(lambda: forget(make_store(config), "test-host", Policy(keep_last=1),
                                      dry_run=True))
    assert [d.upload_id for d in report.decisions if d.keep] == [later["upload_id"]]


def test_a_prune_stopped_right_after_taking_its_lease_gives_it_back_and_its_plan(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM left the lease 1 time in 40 (every prune then refused for 30 minutes)
    and, later in the run, the plan (every sync then stored its pieces again)."""
    from akosha_sync.repository import prune as prune_module
    from akosha_sync.repository.forget import forget
    from akosha_sync.repository.retention import Policy

    config = s3_config(export_memories=False)
    first = _sync(config)
    store = make_store(config)
    anyio.run(lambda: forget(store, "test-host", Policy(), dry_run=False,
                             upload_ids=[first["upload_id"]]))
    take_lease = prune_module._Lease.take
    stop: list[anyio.CancelScope] = []

    async def taken_then_stopped(self: Any, *args: Any) -> None:  # the signal, at the seam
        await take_lease(self, *args)
        stop[0].cancel()
        await anyio.lowlevel.checkpoint()  # where the cancellation lands

    def stopped_once_planned() -> None:
        stop[0].cancel()

    async def prune_until_stopped(**seams: Any) -> None:
        with anyio.CancelScope() as scope:
            stop[:] = [scope]
            await prune_module.prune(store, "test-host", dry_run=False, wait_seconds=0,
                                     **seams)
        assert scope.cancelled_caught

    monkeypatch.setattr(prune_module._Lease, "take", taken_then_stopped)
    anyio.run(prune_until_stopped)
    locks = [k for k in faults.objects(minio_client, s3_bucket) if "/locks/" in k]
    assert locks == []
    monkeypatch.undo()
    anyio.run(lambda: prune_until_stopped(on_planned=stopped_once_planned))
    locks = [k for k in faults.objects(minio_client, s3_bucket) if "/locks/" in k]
    assert locks == []
    report = anyio.run(lambda: prune_module.prune(store, "test-host", dry_run=False))
    assert report.deleted and faults.restore_problems(minio_client, s3_bucket) == []
