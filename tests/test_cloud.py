"""The cloud method against a real S3 server (SeaweedFS), checked with the minio client."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
import zstandard
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.manifest import akosha_manifest_problems
from akosha_sync.sample import SampleInfo, add_conversations, grow_to_size
from akosha_sync.sync.cloud import CloudSyncMethod
from akosha_sync.sync.protocol import CloudUploadError
from akosha_sync.sync.state import target_id
from akosha_sync.sync.status import local_status
from support.verify import get_object, manifests

MakeConfig = Callable[..., AkoshaSyncConfig]


@pytest.fixture
def s3_config(s3_config: MakeConfig) -> MakeConfig:
    """These tests pin the whole-object layout (``storage_layout = "files"``); the
    blocks layout has its own in tests/test_repository_*.py and tests/test_restore.py."""

    def make(**overrides: Any) -> AkoshaSyncConfig:
        return s3_config(**{"storage_layout": "files", **overrides})

    return make


def _sync(config: AkoshaSyncConfig, **kwargs: Any) -> dict[str, Any]:
    method = CloudSyncMethod(config, **kwargs)
    return anyio.run(method.sync)


def _memories_key(upload_id: str) -> str:
    return f"systems/test-host/uploads/{upload_id}/memories.json"




def test_round_trip_includes_wal_rows(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    result = _sync(s3_config())

    assert result["success"] is True and result["error"] is None
    assert set(result) >= {"method", "success", "files_uploaded", "bytes_transferred",
                           "duration_seconds", "upload_id", "error"}
    assert result["method"] == "cloud"
    uid = result["upload_id"]
    assert uid.endswith("_test-host") and len(uid) == len("20250101_000000_test-host")
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    assert result["manifest_key"] == f"systems/test-host/uploads/{uid}/manifest.json"
    assert akosha_manifest_problems(manifest) == []
    assert manifest["files"] == ["knowledge_graph.duckdb", "memories.json", "reflection.duckdb",
                                 "reflection.duckdb.wal"]
    assert manifest["file_details"]["reflection.duckdb"]["wal"] == "reflection.duckdb.wal"
    assert manifest["file_details"]["knowledge_graph.duckdb"]["wal"] is None

    restored_dir = tmp_path / "restored"
    restored_dir.mkdir()
    for name, detail in manifest["file_details"].items():
        assert detail["key"] == f"systems/test-host/uploads/{uid}/{name}"
        stored = get_object(minio_client, s3_bucket, detail["key"])
        assert hashlib.sha256(stored).hexdigest() == detail["stored_sha256"]
        assert len(stored) == detail["stored_size"]
        original = (
            zstandard.ZstdDecompressor().decompressobj().decompress(stored)
            if detail["compression"] == "zstd" else stored
        )
        assert hashlib.sha256(original).hexdigest() == detail["sha256"]
        (restored_dir / name).write_bytes(original)
    # The snapshot is the live files, byte for byte.
    assert (restored_dir / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()
    assert (restored_dir / "reflection.duckdb.wal").read_bytes() == (
        sample.reflection_wal_path.read_bytes())
    for name in ("reflection.duckdb", "knowledge_graph.duckdb"):
        restored = restored_dir / name
        con = duckdb.connect(str(restored), read_only=True)
        try:
            for table, count in sample.row_counts.items():
                present = con.execute(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                    [table],
                ).fetchone()
                if present and present[0]:
                    got = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
                    assert got is not None and got[0] == count, (name, table)
            if name == "reflection.duckdb":
                ids = {r[0] for r in con.execute(
                    f"SELECT id FROM {sample.conversations_table}").fetchall()}
                assert set(sample.wal_conversation_ids) <= ids  # rows only in the WAL
        finally:
            con.close()

    memories = json.loads(get_object(minio_client, s3_bucket, _memories_key(uid)))
    # Every kind is in Akosha's one list; the conversations are marked as such.
    conversations = [
        c for c in memories["conversations"] if c["metadata"]["record_type"] == "conversation"
    ]
    assert manifest["conversation_count"] == sample.row_counts[sample.conversations_table]
    assert result["new_conversation_count"] == len(conversations) > 0
    first = conversations[0]
    assert set(first) == {"id", "content", "embedding", "timestamp", "metadata"}
    assert len(first["embedding"]) == 384 and first["metadata"]["source"] == "test-host"
    exported = {c["metadata"]["original_id"] for c in conversations}
    assert set(sample.wal_conversation_ids) <= exported
    assert result["bytes_transferred"] >= sum(
        manifest["file_details"][n]["stored_size"] for n in manifest["files"]
    )


def test_resync_sends_no_database_and_changed_one_is_sent(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo
) -> None:
    config = s3_config()
    first = _sync(config)
    second = _sync(config)

    assert second["success"]
    assert not [k for k in second["files_uploaded"] if k.endswith(".duckdb")]
    assert sorted(second["files_unchanged"]) == ["knowledge_graph.duckdb", "reflection.duckdb",
                                                 "reflection.duckdb.wal"]
    manifest = json.loads(get_object(minio_client, s3_bucket, second["manifest_key"]))
    for name in ("reflection.duckdb", "reflection.duckdb.wal", "knowledge_graph.duckdb"):
        detail = manifest["file_details"][name]
        assert detail["reused_from"] == first["upload_id"]
        assert first["upload_id"] in detail["key"]
        minio_client.stat_object(s3_bucket, detail["key"])  # the object really is there
    # Still the snapshot's total; none of them is new.
    assert manifest["conversation_count"] == first["conversation_count"] > 0
    assert second["new_conversation_count"] == 0
    memories = json.loads(get_object(minio_client, s3_bucket, _memories_key(second["upload_id"])))
    assert memories == {"conversations": []}

    new_ids = add_conversations(sample.data_dir, 4, seed=99)
    third = _sync(config)
    uploaded = [k.rsplit("/", 1)[-1] for k in third["files_uploaded"]]
    # The new rows are in the WAL only: the WAL is sent again, the database file is not.
    assert "reflection.duckdb.wal" in uploaded
    assert "reflection.duckdb" not in uploaded and "knowledge_graph.duckdb" not in uploaded
    assert sorted(third["files_unchanged"]) == ["knowledge_graph.duckdb", "reflection.duckdb"]

    add_conversations(sample.data_dir, 2, seed=100, checkpoint=True)  # now the file changes
    fourth = _sync(config)
    uploaded = [k.rsplit("/", 1)[-1] for k in fourth["files_uploaded"]]
    assert "reflection.duckdb" in uploaded and "reflection.duckdb.wal" not in uploaded
    assert fourth["files_unchanged"] == ["knowledge_graph.duckdb"]
    memories = json.loads(get_object(minio_client, s3_bucket, _memories_key(third["upload_id"])))
    sent = sorted(c["metadata"]["original_id"] for c in memories["conversations"])
    assert sent == sorted(new_ids)


def test_lost_local_state_uses_the_last_remote_manifest(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    first = _sync(config)
    shutil.rmtree(tmp_path / "state")
    second = _sync(config)
    assert second["success"]
    assert sorted(second["files_unchanged"]) == ["knowledge_graph.duckdb", "reflection.duckdb",
                                                 "reflection.duckdb.wal"]
    assert second["upload_id"] != first["upload_id"]


def test_the_same_store_spelled_another_way_is_the_same_target(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, seaweedfs: Any
) -> None:
    """``HTTP://127.0.0.1:PORT/`` names the store ``http://127.0.0.1:PORT`` does: its
    state and what it was delivered carry over, not every record sent again."""
    first = _sync(s3_config())
    assert first["success"] and first["new_conversation_count"] > 0
    respelled = seaweedfs.endpoint.replace("http://", "HTTP://") + "/"
    second = _sync(s3_config(cloud_endpoint=respelled))
    assert second["success"], second["error"]
    assert second["new_conversation_count"] == 0
    assert not [k for k in second["files_uploaded"] if k.endswith(".duckdb")]
    memories = json.loads(get_object(minio_client, s3_bucket, _memories_key(second["upload_id"])))
    assert memories == {"conversations": []}


def test_state_kept_under_the_endpoint_as_written_is_taken_over(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, seaweedfs: Any,
    tmp_path: Path,
) -> None:
    """An earlier version keyed the state and the delivered records by the endpoint as
    written (here with a trailing '/'): status still shows its last upload, and the
    next sync takes both over instead of sending every record again."""
    config = s3_config(cloud_endpoint=seaweedfs.endpoint + "/")
    first = _sync(config)
    assert first["success"] and first["new_conversation_count"] > 0
    key = ("cloud", config.cloud_bucket, config.system_id_resolved)
    normal = target_id(key[0], seaweedfs.endpoint, *key[1:])
    spelled = target_id(key[0], config.cloud_endpoint, *key[1:])
    targets = tmp_path / "state" / "targets"
    (targets / f"{normal}.json").rename(targets / f"{spelled}.json")
    con = duckdb.connect(str(tmp_path / "state" / "delivered.duckdb"))
    con.execute("INSERT INTO delivered SELECT ?, kind, id FROM delivered WHERE channel = ?",
                [spelled, normal])
    con.execute("DELETE FROM delivered WHERE channel = ?", [normal])
    con.close()

    assert local_status(config)["last_upload"]["upload_id"] == first["upload_id"]
    second = _sync(config)
    assert second["success"], second["error"]
    assert second["new_conversation_count"] == 0
    assert not [k for k in second["files_uploaded"] if k.endswith(".duckdb")]
    memories = json.loads(get_object(minio_client, s3_bucket, _memories_key(second["upload_id"])))
    assert memories == {"conversations": []}
    assert sorted(p.name for p in targets.iterdir()) == [f"{normal}.json"]


def test_export_off_counts_all_conversations(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo
) -> None:
    result = _sync(s3_config(export_memories=False))
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    assert "memories.json" not in manifest["files"]
    assert manifest["conversation_count"] == sample.row_counts[sample.conversations_table]


def test_uncompressed_upload_is_the_snapshot_itself(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo
) -> None:
    result = _sync(s3_config(enable_compression=False))
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    detail = manifest["file_details"]["reflection.duckdb"]
    stored = get_object(minio_client, s3_bucket, detail["key"])
    assert detail["compression"] is None and manifest["compressed"] is False
    assert stored == sample.reflection_path.read_bytes()
    assert hashlib.sha256(stored).hexdigest() == detail["sha256"] == detail["stored_sha256"]
    assert akosha_manifest_problems(manifest) == []


def test_two_syncs_in_the_same_second_do_not_collide(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str
) -> None:
    frozen = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    config = s3_config()

    async def both() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []

        async def one() -> None:
            results.append(await CloudSyncMethod(config, clock=lambda: frozen).sync())

        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
        return results

    results = anyio.run(both)
    ids = sorted(r["upload_id"] for r in results)
    assert ids == ["20261125_120000_test-host", "20261125_120000_test-host.2"]
    assert all(r["success"] for r in results)
    assert len(manifests(minio_client, s3_bucket)) == 2


class _WatchedLock:
    """PROGRESS_LOCK with a flag raised by anyone who asks for it (a seam, not a fake:
    the lock is still a real lock that others hold and wait for)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wanted = threading.Event()

    def __enter__(self) -> None:
        self.wanted.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_commit_waits_for_the_progress_lock_off_the_event_loop(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another sync's export holds PROGRESS_LOCK while it waits for this event loop
    (its upload runs there). Waiting for the lock on the loop would deadlock them, so
    the commit must wait in a thread: the deterministic form of the two-syncs test."""
    import asyncio

    from akosha_sync.sync import cloud, records

    watched = _WatchedLock()
    monkeypatch.setattr(records, "PROGRESS_LOCK", watched)
    real_commit = cloud.commit_manifest
    loop_ran = threading.Event()
    verdict: dict[str, bool] = {}

    def other_export(loop: asyncio.AbstractEventLoop, held: threading.Event) -> None:
        with watched.lock:  # held the way an export holds it
            held.set()
            verdict["commit asked"] = watched.wanted.wait(30)
            loop.call_soon_threadsafe(loop_ran.set)  # what the export's send needs
            verdict["loop ran"] = loop_ran.wait(10)

    async def commit_then_lock(*args: Any, **kwargs: Any) -> None:
        await real_commit(*args, **kwargs)
        watched.wanted.clear()  # this sync's own export asked before; not the commit
        held = threading.Event()
        thread = threading.Thread(
            target=other_export, args=(asyncio.get_running_loop(), held), daemon=True
        )
        thread.start()
        await anyio.to_thread.run_sync(held.wait, 30)

    monkeypatch.setattr(cloud, "commit_manifest", commit_then_lock)
    result = _sync(s3_config())
    assert result["success"], result
    assert verdict == {"commit asked": True, "loop ran": True}
    assert len(manifests(minio_client, s3_bucket)) == 1


def test_wrong_credentials_fail_fast_and_clearly(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, seaweedfs: Any
) -> None:
    config = s3_config(secret_access_key="definitely-not-the-secret", max_retries=3)
    started = time.monotonic()
    with pytest.raises(CloudUploadError) as info:
        _sync(config)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "credentials" in message and s3_bucket in message and seaweedfs.endpoint in message
    assert "definitely-not-the-secret" not in message
    assert manifests(minio_client, s3_bucket) == []


def test_missing_bucket_fails_fast_and_clearly(s3_config: MakeConfig) -> None:
    started = time.monotonic()
    with pytest.raises(CloudUploadError) as info:
        _sync(s3_config(cloud_bucket="no-such-bucket-here", max_retries=3))
    assert time.monotonic() - started < 5
    assert "does not exist" in str(info.value) and "no-such-bucket-here" in str(info.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_connection_fails_fast_and_says_so(s3_config: MakeConfig) -> None:
    endpoint = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(CloudUploadError) as info:
        _sync(s3_config(cloud_endpoint=endpoint, max_retries=3, retry_backoff_seconds=2.0))
    assert time.monotonic() - started < 2.5
    assert info.value.connect_failed
    assert "could not connect" in str(info.value) and endpoint in str(info.value)


def test_server_stopped_mid_upload_leaves_no_manifest_and_next_sync_succeeds(
    make_config: MakeConfig, private_seaweedfs: Any, s3_credentials: Any, tmp_path: Path
) -> None:
    big = grow_to_size(tmp_path / "big-data", 24, 1)
    config = make_config(
        storage_layout="files",
        cloud_bucket="private",
        cloud_endpoint=private_seaweedfs.endpoint,
        access_key_id=s3_credentials.access_key,
        secret_access_key=s3_credentials.secret_key,
        data_dir=str(big.data_dir),
        enable_compression=False,
        max_retries=0,
    )
    killed: list[int] = []

    def kill_mid_upload(phase: str, done: int, total: int) -> None:
        if phase == "upload:reflection.duckdb" and 0 < done < total and not killed:
            killed.append(done)
            private_seaweedfs.kill()

    with pytest.raises(CloudUploadError):
        anyio.run(lambda: CloudSyncMethod(config).sync(progress=kill_mid_upload))
    assert killed, "the upload never reached the middle"

    private_seaweedfs.restart()
    client = private_seaweedfs.minio_client()
    assert manifests(client, "private") == []

    result = _sync(config)
    assert result["success"]
    assert len(manifests(client, "private")) == 1
    manifest = json.loads(get_object(client, "private", result["manifest_key"]))
    stored = get_object(client, "private", manifest["file_details"]["reflection.duckdb"]["key"])
    detail = manifest["file_details"]["reflection.duckdb"]
    assert hashlib.sha256(stored).hexdigest() == detail["sha256"]


def test_unreadable_database_is_named_and_the_other_still_syncs(
    s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio, s3_bucket: str
) -> None:
    sample.reflection_path.write_bytes(b"not a duckdb file at all " * 1000)
    sample.reflection_wal_path.unlink()
    result = _sync(s3_config())
    assert result["success"] is False
    assert str(sample.reflection_path) in result["error"]
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    assert manifest["files"] == ["knowledge_graph.duckdb", "memories.json"]
    assert result["files_uploaded"]  # the readable one went


def test_missing_database_is_skipped_and_named(
    s3_config: MakeConfig, sample: SampleInfo
) -> None:
    sample.knowledge_graph_path.unlink()
    result = _sync(s3_config())
    assert result["success"] is True
    assert result["files_missing"] == ["knowledge_graph.duckdb"]


def test_manifest_accepted_by_akoshas_own_schema(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, akosha_python: Path,
    tmp_path: Path,
) -> None:
    first = _sync(s3_config())
    second = _sync(s3_config())
    for result in (first, second):
        path = tmp_path / "manifest.json"
        path.write_bytes(get_object(minio_client, s3_bucket, result["manifest_key"]))
        check = (
            "import json, sys\n"
            "from akosha.models.schemas import SystemMemoryUploadManifest as M\n"
            "m = M.model_validate(json.load(open(sys.argv[1])))\n"
            "print(m.conversation_count)\n"
        )
        out = subprocess.run(
            [str(akosha_python), "-c", check, str(path)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert int(out.stdout.strip().splitlines()[-1]) == json.loads(path.read_text())[
            "conversation_count"]


def test_no_secret_in_any_output_or_log(
    s3_config: MakeConfig, tmp_path: Path, seaweedfs: Any, s3_bucket: str, s3_credentials: Any
) -> None:
    secret = s3_credentials.secret_key
    key_id = s3_credentials.access_key
    toml = tmp_path / "config.toml"
    log = tmp_path / "state" / "akosha-sync.log"
    config = s3_config()
    toml.write_text(
        f'cloud_bucket = "{s3_bucket}"\ncloud_endpoint = "{seaweedfs.endpoint}"\n'
        f'system_id = "test-host"\ndata_dir = "{config.data_dir}"\n'
        f'state_dir = "{config.state_dir}"\nlog_file = "{log}"\nmax_retries = 0\n'
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"),
           "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    exe = str(Path(__import__("sys").executable).with_name("akosha-sync"))
    runs = [
        subprocess.run([exe, "--config", str(toml), "sync", "--json"], env=env,
                       capture_output=True, text=True, timeout=120, check=False),
        subprocess.run([exe, "--config", str(toml), "status", "--json"], env=env,
                       capture_output=True, text=True, timeout=60, check=False),
        # Wrong secret: the failure path must not echo it either.
        subprocess.run([exe, "--config", str(toml), "sync"],
                       env={**env, "AWS_SECRET_ACCESS_KEY": secret + "-wrong"},
                       capture_output=True, text=True, timeout=120, check=False),
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert json.loads(runs[0].stdout)["success"] is True
    assert runs[2].returncode != 0 and "credentials" in runs[2].stderr
    texts = [r.stdout + r.stderr for r in runs] + [log.read_text()]
    assert log.read_text().strip(), "the log file is empty"
    for text in texts:
        assert secret not in text
        assert key_id not in text


def test_state_lock_serialises_two_syncs_on_one_machine(s3_config: MakeConfig) -> None:
    """The CLI and the daemon both go through run_sync: never two uploads at once.

    Sync "b" is started from inside sync "a" (at its first upload): with the lock it
    waits until "a" has committed, so none of its progress falls inside "a"'s.
    """
    from akosha_sync.sync.runner import run_sync

    config = s3_config(force_method="cloud")
    events: list[str] = []

    async def both() -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:

            def on_progress(tag: str, phase: str) -> None:
                events.append(tag)
                if tag == "a" and phase.startswith("upload:") and "started-b" not in events:
                    events.append("started-b")
                    tg.start_soon(one, "b")

            async def one(tag: str) -> None:
                results.append(await run_sync(
                    config, trigger=tag, progress=lambda p, d, t: on_progress(tag, p)))

            tg.start_soon(one, "a")
        return results

    results = anyio.run(both)
    assert len(results) == 2 and all(r["success"] for r in results)
    events.remove("started-b")
    assert "b" in events
    assert events[: events.index("b")] == ["a"] * events.count("a")
