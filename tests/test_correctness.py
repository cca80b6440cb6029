"""Correctness fixes of issue 9, each against real SeaweedFS / real Akosha.

Faults are injected only at a seam (one obstore call, one copy write); everything
else runs for real, and what landed in the bucket is read back with the minio client.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import obstore
import pytest
import zstandard
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.manifest import akosha_manifest_problems
from akosha_sync.sample import SampleInfo
from akosha_sync.sync.cloud import CloudSyncMethod
from akosha_sync.sync.protocol import CloudUploadError
from support.verify import get_object, manifests

MakeConfig = Callable[..., AkoshaSyncConfig]

_real_put = obstore.put_async


def _keys(client: Minio, bucket: str) -> set[str]:
    return {
        str(o.object_name)
        for o in client.list_objects(bucket, prefix="systems/", recursive=True)
    }


def _assert_upload_complete(client: Minio, bucket: str, manifest_key: str) -> dict[str, Any]:
    """The manifest is valid for Akosha and every file it names is there, intact."""
    manifest: dict[str, Any] = json.loads(get_object(client, bucket, manifest_key))
    assert akosha_manifest_problems(manifest) == []
    index = (
        json.loads(get_object(client, bucket, manifest["index"]))
        if manifest.get("storage_layout") == "blocks" else None
    )
    for name, detail in manifest["file_details"].items():
        if index is not None and name in index["files"]:
            # Blocks layout: the file is its pieces, each in a pack that is there.
            entry = index["files"][name]
            parts = []
            for sha, pack_id, offset, stored_len, _length, compression in entry["pieces"]:
                pack = get_object(client, bucket, index["packs"][pack_id]["key"])
                raw = pack[offset : offset + stored_len]
                if compression == "zstd":
                    raw = zstandard.ZstdDecompressor().decompress(raw)
                assert hashlib.sha256(raw).hexdigest() == sha
                parts.append(raw)
            assert hashlib.sha256(b"".join(parts)).hexdigest() == detail["sha256"]
            continue
        stored = get_object(client, bucket, detail["key"])
        assert hashlib.sha256(stored).hexdigest() == detail["stored_sha256"]
        original = (
            zstandard.ZstdDecompressor().decompressobj().decompress(stored)
            if detail["compression"] == "zstd" else stored
        )
        assert hashlib.sha256(original).hexdigest() == detail["sha256"]
    return manifest


# ------------------------------------------------------------- A. ambiguous commit
def test_lost_manifest_answer_is_resolved_by_reading_back(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first manifest PUT commits on the real store but its answer is lost."""
    lost: list[str] = []

    async def put_then_lose_answer(store: Any, key: str, body: Any, **kw: Any) -> Any:
        result = await _real_put(store, key, body, **kw)
        if key.endswith("/manifest.json") and not lost:
            lost.append(key)
            raise ConnectionResetError("connection reset by peer (answer lost)")
        return result

    monkeypatch.setattr(obstore, "put_async", put_then_lose_answer)
    result = anyio.run(CloudSyncMethod(s3_config()).sync)

    assert lost, "the fault was not injected"
    assert result["success"] is True, result["error"]
    assert manifests(minio_client, s3_bucket) == [result["manifest_key"]]
    _assert_upload_complete(minio_client, s3_bucket, result["manifest_key"])


def test_foreign_manifest_is_a_conflict_and_nothing_is_deleted(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another writer commits at our key just before us: a conflict, not a success,
    and nothing under that upload (theirs or ours) is removed."""
    foreign = b'{"conversation_count": 7, "uploaded_at": "someone else"}\n'
    seen: dict[str, str] = {}

    async def foreign_commits_first(store: Any, key: str, body: Any, **kw: Any) -> Any:
        if key.endswith("/manifest.json") and "key" not in seen:
            seen["key"] = key
            folder = key.rsplit("/", 1)[0]
            minio_client.put_object(s3_bucket, key, io.BytesIO(foreign), len(foreign))
            minio_client.put_object(
                s3_bucket, f"{folder}/their-data.bin", io.BytesIO(b"theirs"), 6
            )
        return await _real_put(store, key, body, **kw)

    monkeypatch.setattr(obstore, "put_async", foreign_commits_first)
    with pytest.raises(CloudUploadError, match="another manifest already exists"):
        anyio.run(CloudSyncMethod(s3_config()).sync)

    key = seen["key"]
    folder = key.rsplit("/", 1)[0]
    assert get_object(minio_client, s3_bucket, key) == foreign
    left = _keys(minio_client, s3_bucket)
    assert f"{folder}/their-data.bin" in left
    # Our objects under that folder may be the other writer's too: none was deleted.
    assert {f"{folder}/index.json", f"{folder}/memories.json"} <= left  # blocks layout
    assert any("/packs/" in k for k in left)


def test_timeout_just_after_the_manifest_committed_deletes_nothing(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The store commits the manifest, then the answer never comes: the sync's
    deadline ends it, and the upload stays complete."""
    from akosha_sync.sync.deadline import Deadline

    committed: list[str] = []

    async def commit_then_hang(store: Any, key: str, body: Any, **kw: Any) -> Any:
        result = await _real_put(store, key, body, **kw)
        if key.endswith("/manifest.json"):
            committed.append(key)
            await anyio.sleep_forever()
        return result

    monkeypatch.setattr(obstore, "put_async", commit_then_hang)
    method = CloudSyncMethod(s3_config())

    async def main() -> None:
        await method.sync(deadline=Deadline(8.0))

    with pytest.raises(CloudUploadError, match="may have been written"):
        anyio.run(main)
    assert committed
    assert manifests(minio_client, s3_bucket) == committed
    _assert_upload_complete(minio_client, s3_bucket, committed[0])


def test_commit_manifest_is_idempotent_for_the_same_bytes(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
) -> None:
    from akosha_sync.repository.store import ManifestConflictError, commit_manifest, make_store

    config = s3_config()
    store = make_store(config)
    key = "systems/test-host/uploads/x/manifest.json"

    async def main() -> None:
        await commit_manifest(store, key, b"ours", config=config)
        await commit_manifest(store, key, b"ours", config=config)  # a retry: success
        with pytest.raises(ManifestConflictError):
            await commit_manifest(store, key, b"other", config=config)

    anyio.run(main)
    assert get_object(minio_client, s3_bucket, key) == b"ours"


# ------------------------------------------------------ B. snapshot folders, disk full
def _snapshot_dirs(config: AkoshaSyncConfig) -> list[str]:
    root = config.state_path / "snapshots"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_cancelled_sync_removes_its_snapshot_folder(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config()
    method = CloudSyncMethod(config)
    phases: list[str] = []

    async def main() -> None:
        with anyio.CancelScope() as scope:

            def progress(phase: str, done: int, total: int) -> None:
                phases.append(phase)
                if phase.startswith("upload:"):  # one object is up, the others are not
                    scope.cancel()

            await method.sync(progress=progress)
        assert scope.cancelled_caught

    anyio.run(main)
    assert any(p.startswith("upload:") for p in phases)
    assert "manifest" not in phases
    assert _snapshot_dirs(config) == []
    assert manifests(minio_client, s3_bucket) == []


def test_leftover_snapshot_folders_are_swept_under_the_lock(s3_config: MakeConfig) -> None:
    from akosha_sync.sync.runner import run_sync

    config = s3_config()
    leftover = config.state_path / "snapshots" / "20250101_000000_test-host"
    leftover.mkdir(parents=True)
    (leftover / "reflection.duckdb").write_bytes(b"x" * 1024)

    result = anyio.run(run_sync, config)

    assert result["success"] is True, result["error"]
    assert _snapshot_dirs(config) == []


def test_full_disk_while_copying_a_snapshot_is_reported_as_such(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno
    import os

    from akosha_sync.sync import snapshot

    real_copy = snapshot._copy_hashing

    def disk_fills_up(src: Path, dst: Path) -> str:
        if dst.name != "reflection.duckdb":
            return real_copy(src, dst)
        with dst.open("wb") as fh:
            fh.write(src.read_bytes()[:4096])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    monkeypatch.setattr(snapshot, "_copy_hashing", disk_fills_up)
    # The files layout always copies (the blocks layout copies only when a writer holds
    # the database, and then reports a full disk the same way).
    config = s3_config(storage_layout="files")
    result = anyio.run(CloudSyncMethod(config).sync)

    error = result["error"] or ""
    assert result["success"] is False
    assert "no space left on device while copying" in error
    assert "free space or move state_dir" in error
    assert "permissions" not in error
    # The other database still synced; nothing of the failed copy is left behind.
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    assert "knowledge_graph.duckdb" in manifest["files"]
    assert "reflection.duckdb" not in manifest["files"]
    assert _snapshot_dirs(config) == []


# ------------------------------------------------------------ C. one deadline per sync
class _Stall:
    """A loopback TCP server that accepts connections and never answers."""

    def __init__(self) -> None:
        import socket
        import threading

        self._sock = socket.create_server(("127.0.0.1", 0))
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self.port = int(self._sock.getsockname()[1])
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


@pytest.fixture
def stall() -> Any:
    server = _Stall()
    yield server
    server.close()


def _timed_run_sync(config: AkoshaSyncConfig, **kwargs: Any) -> tuple[dict[str, Any], float]:
    import time

    from akosha_sync.sync.runner import run_sync

    async def main() -> dict[str, Any]:
        return await run_sync(config, **kwargs)

    started = time.monotonic()
    result = anyio.run(main)
    return result, time.monotonic() - started


def test_a_stalled_store_fails_within_the_sync_budget(s3_config: MakeConfig, stall: Any) -> None:
    from akosha_sync.sync.deadline import Deadline

    config = s3_config(cloud_endpoint=stall.url, upload_timeout_seconds=30)
    result, took = _timed_run_sync(config, method="cloud", deadline=Deadline(2.0))

    assert result["success"] is False
    assert "share of the sync's budget" in result["error"], result["error"]
    assert took < 6.0, f"a 2 s budget took {took:.1f} s"


def test_the_lock_wait_counts_against_the_budget(s3_config: MakeConfig) -> None:
    import fcntl
    import os

    from akosha_sync.sync.deadline import Deadline

    config = s3_config(upload_timeout_seconds=30)
    config.state_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.state_path / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process is syncing
        result, took = _timed_run_sync(config, deadline=Deadline(1.0))
    finally:
        os.close(fd)
    assert result["success"] is False
    assert "another akosha-sync process is uploading" in result["error"]
    assert result["method"] == config.force_method  # what was asked for, not "lock"
    assert took < 4.0, f"a 1 s budget took {took:.1f} s"


def test_fallback_gets_what_the_cloud_leaves_of_one_budget(
    s3_config: MakeConfig, stall: Any, akosha: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cloud stalls until its share ends; the fallback gets the rest of the
    same budget. The reserve is widened for the test (the policy's own numbers are
    checked below), so Akosha has ample time even on a loaded machine."""
    import uuid

    from akosha_sync.sync import hybrid
    from akosha_sync.sync.deadline import Deadline

    budget, reserve = 12.0, 9.0
    monkeypatch.setattr(hybrid, "fallback_reserve", lambda seconds: reserve)
    config = s3_config(
        cloud_endpoint=stall.url, akosha_url=akosha.url, upload_timeout_seconds=30,
        system_id=f"deadline-{uuid.uuid4().hex[:8]}",
    )
    result, took = _timed_run_sync(config, deadline=Deadline(budget))

    assert result["success"] is True, result
    assert result["method"] == "http" and result["fallback_from"] == ["cloud"]
    cloud = result["method_attempts"][0]
    assert f"{budget - reserve:.0f}s share" in cloud["error"]
    assert cloud["duration_seconds"] < budget - reserve + 1.0
    assert took < budget + 2.0, f"a {budget:g} s budget took {took:.1f} s"


def test_the_fallback_reserve_policy() -> None:
    from akosha_sync.sync.deadline import Deadline, fallback_reserve

    assert fallback_reserve(300) == 30.0  # the default: cloud 270 s, fallback >= 30 s
    assert fallback_reserve(30) == 7.5
    deadline = Deadline(100.0)
    share = deadline.leaving(fallback_reserve(deadline.seconds))
    assert 74.0 < share.remaining() <= 75.0 and share.end < deadline.end


def test_request_timeout_scales_with_the_part_size(make_config: MakeConfig) -> None:
    from akosha_sync.repository.store import make_store, request_timeout_seconds

    small = make_config(cloud_bucket="b", cloud_endpoint="http://127.0.0.1:9", chunk_size_mb=5)
    large = make_config(cloud_bucket="b", cloud_endpoint="http://127.0.0.1:9", chunk_size_mb=100)
    assert request_timeout_seconds(small) == 70
    assert request_timeout_seconds(large) == 260
    store: Any = make_store(large)
    assert store.client_options["timeout"] == "260s"


# ---------------------------------------------------- D. conversation_count, E. records
_KIND_TABLES = {
    "conversation": ("reflection_path", "conversations_v2"),
    "reflection": ("reflection_path", "reflections_v2"),
    "entity": ("knowledge_graph_path", "kg_entities"),
}


def _source_ids(sample: SampleInfo, kind: str, *, embedded: bool) -> set[str]:
    import duckdb

    attr, table = _KIND_TABLES[kind]
    condition = "IS NOT NULL" if embedded else "IS NULL"
    con = duckdb.connect(str(getattr(sample, attr)), read_only=True)
    try:
        rows = con.execute(f"SELECT id FROM {table} WHERE embedding {condition}").fetchall()
    finally:
        con.close()
    return {str(r[0]) for r in rows}


def test_conversation_count_is_the_snapshot_total_and_new_ones_are_separate(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    from akosha_sync.sample import add_conversations

    config = s3_config()
    total = sample.row_counts[sample.conversations_table]
    first = anyio.run(CloudSyncMethod(config).sync)
    again = anyio.run(CloudSyncMethod(config).sync)  # nothing changed
    add_conversations(sample.data_dir, 3, seed=7)
    third = anyio.run(CloudSyncMethod(config).sync)

    for result, expected_total, new in ((first, total, total), (again, total, 0),
                                        (third, total + 3, 3)):
        manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
        assert manifest["conversation_count"] == expected_total == result["conversation_count"]
        assert result["new_conversation_count"] == new
        assert manifest["metadata"]["new_conversation_count"] == new
        assert manifest["file_details"]["memories.json"]["conversation_count"] == new

    off = anyio.run(CloudSyncMethod(s3_config(export_memories=False)).sync)
    assert off["conversation_count"] == total + 3 and off["new_conversation_count"] is None


def test_memories_json_carries_every_kind_like_the_http_path(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    akosha: Any,
) -> None:
    import uuid

    from akosha_sync.sync.http import HttpSyncMethod
    from akosha_sync.sync.records import memory_id
    from akosha_sync.sync.status import local_status

    sid = f"e-{uuid.uuid4().hex[:8]}"
    config = s3_config(system_id=sid, akosha_url=akosha.url)
    result = anyio.run(CloudSyncMethod(config).sync)
    uid = result["upload_id"]
    memories = json.loads(get_object(
        minio_client, s3_bucket, f"systems/{sid}/uploads/{uid}/memories.json"))

    got: dict[str, set[str]] = {}
    for entry in memories["conversations"]:
        assert set(entry) == {"id", "content", "embedding", "timestamp", "metadata"}
        kind = entry["metadata"]["record_type"]
        assert entry["metadata"]["type"] == kind and entry["id"].startswith(f"{sid}:{kind}:")
        got.setdefault(kind, set()).add(entry["metadata"]["original_id"])
    expected = {kind: _source_ids(sample, kind, embedded=True) for kind in _KIND_TABLES}
    assert got == expected

    no_embedding = {kind: len(_source_ids(sample, kind, embedded=False)) for kind in _KIND_TABLES}
    no_embedding = {k: n for k, n in no_embedding.items() if n}
    assert no_embedding, "the sample has records Akosha cannot take"
    skipped = result["details"]["skipped"]["no_embedding"]
    assert skipped["by_kind"] == no_embedding and skipped["count"] == sum(no_embedding.values())
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    assert manifest["metadata"]["undeliverable"] == no_embedding
    assert manifest["metadata"]["memories"] == {k: len(v) for k, v in expected.items()}

    # The HTTP path delivers exactly these records to the real Akosha.
    http = anyio.run(HttpSyncMethod(config).sync)
    assert http["success"], http["error"]
    assert http["details"]["skipped"]["no_embedding"]["by_kind"] == no_embedding
    ids = [memory_id(sid, kind, i) for kind, found in got.items() for i in found]
    assert anyio.run(akosha.held_ids, ids) == set(ids)

    status = local_status(config)["undeliverable"]
    for method in ("cloud", "http"):
        assert status[method]["by_kind"] == no_embedding
        assert status[method]["count"] == sum(no_embedding.values())


# ------------------------------------------------- F. Session-Buddy 0.32 cloud_sync names
def test_session_buddy_cloud_sync_names_are_read_with_a_clear_precedence() -> None:
    from akosha_sync.config import load_config

    env = {
        "SESSION_BUDDY_CLOUD_SYNC__CLOUD_BUCKET": "nested-bucket",
        "SESSION_BUDDY_CLOUD_SYNC__CLOUD_REGION": "eu-nested",
        "SESSION_BUDDY_CLOUD_SYNC__MAX_RETRIES": "7",
        "SESSION_BUDDY_CLOUD_SYNC__ENABLE_FALLBACK": "false",
        "SESSION_BUDDY_AKOSHA_CLOUD_REGION": "eu-flat",  # flat beats nested
        "SESSION_BUDDY_AKOSHA_MAX_RETRIES": "5",
        "AKOSHA_SYNC_MAX_RETRIES": "2",  # ours beats both
    }
    config = load_config(environ=env)
    assert config.cloud_bucket == "nested-bucket"
    assert config.cloud_region == "eu-flat"
    assert config.max_retries == 2
    assert config.enable_fallback is False
    assert load_config(environ=env, overrides={"max_retries": 1}).max_retries == 1


def test_an_upgrade_exports_the_kinds_an_older_version_never_sent(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """State written before memories.json carried reflections and entities: the
    unchanged databases are read again (their objects still reused) so those
    records reach Akosha instead of waiting for the next change."""
    import duckdb
    import msgspec

    from akosha_sync.sync.cloud import cloud_target_id
    from akosha_sync.sync.state import load_state, save_state

    config = s3_config()
    first = anyio.run(CloudSyncMethod(config).sync)
    assert first["success"], first["error"]
    # Make it look like the older version's state: conversations only.
    tid = cloud_target_id(config)
    state = load_state(config.state_path, tid)
    assert state is not None and state.exported_kinds
    save_state(config.state_path, tid, msgspec.structs.replace(state, exported_kinds=[]))
    con = duckdb.connect(str(config.state_path / "delivered.duckdb"))
    con.execute("DELETE FROM delivered WHERE kind <> 'conversation'")
    con.close()

    second = anyio.run(CloudSyncMethod(config).sync)
    assert second["success"], second["error"]
    assert not [k for k in second["files_uploaded"] if k.endswith((".duckdb", ".wal"))]
    memories = json.loads(get_object(
        minio_client, s3_bucket, f"systems/test-host/uploads/{second['upload_id']}/memories.json"))
    kinds = {e["metadata"]["record_type"] for e in memories["conversations"]}
    assert kinds == {"reflection", "entity"}
    assert second["new_conversation_count"] == 0
