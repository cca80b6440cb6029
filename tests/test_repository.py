"""The bucket as a repository: snapshots, forget, verify, prune against real SeaweedFS,
checked independently with the minio client."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.manifest import FileEntry, build_manifest, encode_manifest
from akosha_sync.repository.retention import Policy, RetentionError
from akosha_sync.repository.service import forget_uploads, prune_unused, snapshots
from akosha_sync.sample import SampleInfo, add_conversations
from akosha_sync.sync.cloud import CloudSyncMethod
from support.configfile import write_toml
from support.faults import restore_problems
from support.verify import get_object, manifests
from support.wait import until

MakeConfig = Callable[..., AkoshaSyncConfig]
EXE = str(Path(sys.executable).with_name("akosha-sync"))


def _sync(config: AkoshaSyncConfig) -> dict[str, Any]:
    return anyio.run(CloudSyncMethod(config).sync)


def _put(client: Minio, bucket: str, key: str, data: bytes) -> None:
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def _keys(client: Minio, bucket: str, prefix: str = "systems/") -> set[str]:
    return {
        o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True)
        if o.object_name
    }


def _hand_made_upload(client: Minio, bucket: str, sid: str, at: datetime) -> str:
    """A files-layout upload at time ``at``: one small database object and a manifest."""
    uid = at.strftime("%Y%m%d_%H%M%S") + f"_{sid}"
    base = f"systems/{sid}/uploads/{uid}"
    body = f"db of {uid}".encode()
    _put(client, bucket, f"{base}/_claim.json", b"{}")
    _put(client, bucket, f"{base}/reflection.duckdb", body)
    import hashlib

    digest = hashlib.sha256(body).hexdigest()
    manifest = build_manifest(
        system_id=sid,
        upload_id=uid,
        uploaded_at=at,
        files={"reflection.duckdb": FileEntry(
            key=f"{base}/reflection.duckdb", original_size=len(body), stored_size=len(body),
            sha256=digest, stored_sha256=digest, compression=None, conversation_count=1,
        )},
        conversation_count=1,
    )
    _put(client, bucket, f"{base}/manifest.json", encode_manifest(manifest))
    return uid


def _cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "--config", str(config_path), *args], capture_output=True, text=True,
        timeout=120, check=False,
    )


# ------------------------------------------------------------------ snapshots
def test_snapshots_lists_complete_and_incomplete_uploads_from_the_bucket(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    config = s3_config(storage_layout="files")  # the blocks layout: see the verify test
    first = _sync(config)
    add_conversations(sample.data_dir, 3, seed=7)
    second = _sync(config)
    # A sync that died before its manifest: a claim and one object, no manifest.
    dead = "20200101_000000_test-host"
    _put(minio_client, s3_bucket, f"systems/test-host/uploads/{dead}/_claim.json", b"{}")
    _put(minio_client, s3_bucket, f"systems/test-host/uploads/{dead}/reflection.duckdb",
         b"x" * 100)
    # Local state is not consulted: remove it.
    import shutil

    shutil.rmtree(config.state_path)

    infos = anyio.run(lambda: snapshots(config))
    assert [i.upload_id for i in infos] == [dead, first["upload_id"], second["upload_id"]]
    incomplete, one, two = infos
    assert incomplete.complete is False and "no manifest.json" in (incomplete.problem or "")
    assert incomplete.bytes_new == 102 and incomplete.conversation_count is None
    assert one.complete and two.complete and one.layout == "files"
    assert one.files == sorted(json.loads(get_object(
        minio_client, s3_bucket, first["manifest_key"]))["file_details"])
    # Bytes new = the objects in the folder; the second upload reused what did not change.
    folder_one = _keys(minio_client, s3_bucket, f"systems/test-host/uploads/{one.upload_id}/")
    sizes = {o.object_name: o.size for o in minio_client.list_objects(
        s3_bucket, prefix=f"systems/test-host/uploads/{one.upload_id}/", recursive=True)}
    # The manifest's own figure, which leaves out the manifest (written last).
    assert one.bytes_new == sum(sizes[k] for k in folder_one if not k.endswith("manifest.json"))
    assert 0 < two.bytes_new < one.bytes_new
    assert one.logical_size == sample.reflection_path.stat().st_size + (
        sample.knowledge_graph_path.stat().st_size) + sum(
        p.stat().st_size for p in sample.data_dir.glob("*.wal")) or one.logical_size > 0
    # The snapshot's total (the manifest's conversation_count), WAL rows included.
    assert one.conversation_count == first["conversation_count"]
    assert two.conversation_count == one.conversation_count + 3
    assert one.last_verification is None

    # The CLI, for another system and for all systems.
    path = write_toml(config, tmp_path / "c.toml")
    _hand_made_upload(minio_client, s3_bucket, "other-host", datetime(2026, 1, 1, tzinfo=UTC))
    out = _cli(path, "snapshots")
    assert out.returncode == 0, out.stderr
    assert dead in out.stdout and "INCOMPLETE" in out.stdout and "other-host" not in out.stdout
    out = _cli(path, "snapshots", "--all-systems", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert {i["system_id"] for i in listed} == {"test-host", "other-host"}
    assert len(listed) == 4
    # A manifest from before bytes_new existed: the objects in its folder count.
    legacy = next(i for i in listed if i["system_id"] == "other-host")
    assert legacy["bytes_new"] == sum(o.size for o in minio_client.list_objects(
        s3_bucket, prefix=f"systems/other-host/uploads/{legacy['upload_id']}/", recursive=True))
    out = _cli(path, "snapshots", "--system", "other-host", "--json")
    assert [i["system_id"] for i in json.loads(out.stdout)] == ["other-host"]


# --------------------------------------------------------------------- forget
def test_forget_against_the_bucket_removes_manifests_and_small_objects_only(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    config = s3_config()
    sid = "test-host"
    newest = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)
    times = [newest - timedelta(hours=h) for h in (0, 1, 2, 25, 26, 24 * 8, 24 * 9)]
    uids = [_hand_made_upload(minio_client, s3_bucket, sid, t) for t in times]
    before = _keys(minio_client, s3_bucket)

    with pytest.raises(RetentionError, match="empty policy"):
        anyio.run(lambda: forget_uploads(config, Policy(), dry_run=False))

    plan = anyio.run(lambda: forget_uploads(config, Policy(keep_daily=2), dry_run=True))
    assert _keys(minio_client, s3_bucket) == before  # a dry run deletes nothing
    # The newest of 10 June (12:00) and the newest of 9 June (11:00).
    expected_kept = {uids[0], uids[3]}
    assert set(plan.kept) == expected_kept
    assert set(plan.forgotten) == set(uids) - expected_kept

    path = write_toml(config, tmp_path / "c.toml")
    out = _cli(path, "forget", "--keep-daily", "2", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert set(report["forgotten"]) == set(plan.forgotten)
    after = _keys(minio_client, s3_bucket)
    remaining = {m.split("/")[3] for m in manifests(minio_client, s3_bucket)}
    assert remaining == expected_kept
    for uid in plan.forgotten:
        base = f"systems/{sid}/uploads/{uid}"
        # The database object stays for prune; manifest and claim are gone.
        assert f"{base}/reflection.duckdb" in after
        assert f"{base}/manifest.json" not in after and f"{base}/_claim.json" not in after
    assert before - after == {
        f"systems/{sid}/uploads/{uid}/{name}"
        for uid in plan.forgotten for name in ("manifest.json", "_claim.json")
    }

    out = _cli(path, "forget")
    assert out.returncode == 2 and "empty policy" in out.stderr


# --------------------------------------------------------------------- verify
def _packs(client: Minio, bucket: str) -> list[str]:
    return sorted(k for k in _keys(client, bucket, "systems/test-host/packs/"))


def test_verify_passes_then_catches_a_missing_pack_a_corrupt_piece_and_wrong_rows(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    from akosha_sync.repository.service import verify_uploads

    config = s3_config()
    first = _sync(config)
    add_conversations(sample.data_dir, 3, seed=11, checkpoint=True)
    second = _sync(config)
    assert first["success"] and second["success"]
    path = write_toml(config, tmp_path / "c.toml")

    out = _cli(path, "verify", "--all", "--read-data", "--open", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["level"] == "structure+read-data+open"
    assert [u["upload_id"] for u in report["uploads"]] == [first["upload_id"],
                                                           second["upload_id"]]
    assert all(u["pieces_read"] > 0 for u in report["uploads"])
    # An upload that is not there is the user's to correct, not a failure of the store.
    out = _cli(path, "verify", "20200101_000000_nowhere")
    assert out.returncode == 1
    assert out.stderr.startswith(
        "akosha-sync verify: upload 20200101_000000_nowhere of system 'test-host' is not in "
        "the bucket"), out.stderr
    # The record is in the bucket and shown by snapshots and status.
    infos = anyio.run(lambda: snapshots(config))
    assert [i.layout for i in infos] == ["blocks", "blocks"]
    assert [i.bytes_new for i in infos] == [
        json.loads(get_object(minio_client, s3_bucket, r["manifest_key"]))["bytes_new"]
        for r in (first, second)]
    assert 0 < infos[1].bytes_new < infos[0].bytes_new
    assert infos[-1].last_verification is not None
    assert infos[-1].last_verification["ok"] is True
    status = json.loads(_cli(path, "status", "--json").stdout)
    assert status["last_verification"]["ok"] is True
    assert status["last_verification"]["level"] == "structure+read-data+open"

    # A database whose rows differ from what its manifest recorded (edited via minio).
    key = second["manifest_key"]
    manifest = json.loads(get_object(minio_client, s3_bucket, key))
    counts = manifest["file_details"]["reflection.duckdb"]["row_counts"]
    table = "conversations_v2" if "conversations_v2" in counts else "conversations"
    counts[table] += 1
    _put(minio_client, s3_bucket, key, json.dumps(manifest).encode())
    rows = anyio.run(lambda: verify_uploads(config, open_databases=True))
    assert not rows.ok and rows.problem_count == 1
    assert f"upload {second['upload_id']}" in rows.uploads[0].problems[0]
    assert f"table {table} has {counts[table] - 1} rows" in rows.uploads[0].problems[0]

    # A corrupt piece: one byte of a pack flipped, same size (structure still passes).
    first_manifest = json.loads(get_object(minio_client, s3_bucket, first["manifest_key"]))
    index = json.loads(get_object(minio_client, s3_bucket, first_manifest["index"]))
    pack = sorted(ref["key"] for ref in index["packs"].values())[0]
    data = bytearray(get_object(minio_client, s3_bucket, pack))
    data[len(data) // 2] ^= 0xFF
    _put(minio_client, s3_bucket, pack, bytes(data))
    assert anyio.run(lambda: verify_uploads(config, upload_id=first["upload_id"])).ok
    bad = anyio.run(lambda: verify_uploads(config, upload_id=first["upload_id"],
                                           read_data="100%"))
    assert not bad.ok
    assert all(pack in p and first["upload_id"] in p for p in bad.uploads[0].problems)
    assert any("SHA-256" in p for p in bad.uploads[0].problems)

    # A deleted pack: the default (structure) level finds it, and the CLI exits 1.
    minio_client.remove_object(s3_bucket, pack)
    out = _cli(path, "verify", first["upload_id"])
    assert out.returncode == 1
    assert f"upload {first['upload_id']}: {pack}: pack" in out.stdout
    assert "missing from the bucket" in out.stdout
    infos = anyio.run(lambda: snapshots(config))
    assert infos[0].last_verification is not None and not infos[0].last_verification["ok"]


def test_an_index_that_is_not_its_manifests_fails_verify_and_restore(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """The first upload's index copied over the second's: every piece it names is there
    and matches its own SHA-256. Before, verify (every level) found nothing and restore
    put the first upload's databases in place as the second's."""
    config = s3_config(export_memories=False)
    first = _sync(config)
    add_conversations(sample.data_dir, 3, seed=13, checkpoint=True)
    second = _sync(config)
    index_of = {r["upload_id"]: json.loads(get_object(minio_client, s3_bucket, r["manifest_key"]))[
        "index"] for r in (first, second)}
    body = get_object(minio_client, s3_bucket, index_of[first["upload_id"]])
    _put(minio_client, s3_bucket, index_of[second["upload_id"]], body)
    path = write_toml(config, tmp_path / "c.toml")
    out = _cli(path, "verify", second["upload_id"], "--read-data", "--open", "--json")
    assert out.returncode == 1, out.stdout
    text = out.stdout
    assert f"the index is upload {first['upload_id']}" in text, text
    target = tmp_path / "back"
    done = _cli(path, "restore", second["upload_id"], "--to", str(target))
    assert done.returncode == 1 and "its index is damaged" in done.stderr, done.stderr
    assert not target.exists() or list(target.iterdir()) == []


def test_damage_found_by_verify_open_alone_is_stored_again_by_the_next_sync(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    """One byte of a pack flipped (same size): `verify --open` fails. Before, only
    read-data recorded damage, so the next sync reused the pack and its upload could
    not be restored either."""
    config = s3_config(export_memories=False)
    first = _sync(config)
    index = _index_of(minio_client, s3_bucket, first["manifest_key"])
    pack = next(iter(index["packs"].values()))["key"]
    data = bytearray(get_object(minio_client, s3_bucket, pack))
    data[len(data) // 2] ^= 0xFF
    _put(minio_client, s3_bucket, pack, bytes(data))
    path = write_toml(config, tmp_path / "c.toml")
    assert _cli(path, "verify", first["upload_id"], "--open").returncode == 1
    second = _sync(config)
    assert second["success"], second["error"]
    again = _cli(path, "verify", second["upload_id"], "--open")
    assert again.returncode == 0, again.stdout + again.stderr


def test_an_open_check_passed_before_a_later_failure_no_longer_counts() -> None:
    """Retention keeps the newest upload that passed `verify --open`; damage found by a
    later check (any level) must end that, or the damaged upload is kept and a sound
    one forgotten in its place."""
    from akosha_sync.repository.checks import CheckRecord, LevelResult

    def record(**levels: tuple[str, bool]) -> CheckRecord:
        return CheckRecord(upload_id="u", levels={
            name: LevelResult(at=at, ok=ok) for name, (at, ok) in levels.items()})

    passed = ("2026-12-01T00:00:00Z", True)
    assert record(open=passed, structure=passed).passed_open
    assert not record(open=passed, **{"read-data": ("2026-12-02T00:00:00Z", False)}).passed_open
    assert record(open=("2026-12-03T00:00:00Z", True),
                  structure=("2026-12-02T00:00:00Z", False)).passed_open  # passed since
    assert not record(open=("2026-12-01T00:00:00Z", False)).passed_open


def test_verify_read_data_subsets_cover_everything_over_t_runs(
    s3_config: MakeConfig, sample: SampleInfo,
) -> None:
    from akosha_sync.repository.service import verify_uploads
    from akosha_sync.repository.verify import parse_subset

    config = s3_config(storage_layout="files")
    assert _sync(config)["success"]
    full = anyio.run(lambda: verify_uploads(config, read_data="100%"))
    parts = [anyio.run(lambda n=n: verify_uploads(config, read_data=f"{n}/3"))
             for n in (1, 2, 3)]
    assert full.ok and all(p.ok for p in parts)
    assert sum(p.uploads[0].pieces_read for p in parts) == full.uploads[0].pieces_read > 0
    with pytest.raises(ValueError, match="not valid"):
        parse_subset("4/3")
    with pytest.raises(ValueError, match="not valid"):
        parse_subset("0%")


# ---------------------------------------------------------------------- prune
def _index_of(client: Minio, bucket: str, manifest_key: str) -> dict[str, Any]:
    manifest = json.loads(get_object(client, bucket, manifest_key))
    return json.loads(get_object(client, bucket, manifest["index"]))


def _prune(config: AkoshaSyncConfig, **kwargs: Any) -> Any:
    from akosha_sync.repository.prune import prune
    from akosha_sync.repository.store import make_store

    store = make_store(config)
    kwargs.setdefault("dry_run", False)
    return anyio.run(lambda: prune(store, "test-host", **kwargs))


def test_prune_removes_exactly_the_unreferenced_objects_and_repacks(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    from akosha_sync.repository.service import verify_uploads

    config = s3_config()
    first = _sync(config)
    add_conversations(sample.data_dir, 5, seed=3, checkpoint=True)
    second = _sync(config)
    old_packs = set(_index_of(minio_client, s3_bucket, first["manifest_key"])["packs"])
    anyio.run(lambda: forget_uploads(config, Policy(keep_last=1), dry_run=False))
    # Garbage of three kinds: a pack nothing lists, an object of a forgotten folder.
    stray_pack = "systems/test-host/packs/ab/" + "ab" * 32 + ".pack"
    _put(minio_client, s3_bucket, stray_pack, b"junk")
    stray = "systems/test-host/uploads/20200101_000000_test-host/reflection.duckdb"
    _put(minio_client, s3_bucket, stray, b"left by a forgotten upload")
    before = _keys(minio_client, s3_bucket)
    index_before = _index_of(minio_client, s3_bucket, second["manifest_key"])
    shared = old_packs & set(index_before["packs"])
    assert shared, "the second upload reuses pieces of the first one's pack"
    shared_keys = {index_before["packs"][p]["key"] for p in shared}

    plan = _prune(config, dry_run=True, repack_below=1.0)
    assert _keys(minio_client, s3_bucket) == before
    assert set(plan.deleted) == {stray_pack, stray} | shared_keys

    report = _prune(config, repack_below=1.0)
    after = _keys(minio_client, s3_bucket)
    new_pack_keys = {f"systems/test-host/packs/{p[:2]}/{p}.pack" for p in report.new_packs}
    assert before - after == {stray_pack, stray} | shared_keys
    assert after - before == new_pack_keys and new_pack_keys
    assert not any("/locks/" in k for k in after)  # lease and plan are gone
    index_after = _index_of(minio_client, s3_bucket, second["manifest_key"])
    assert report.rewritten_indexes == [json.loads(get_object(
        minio_client, s3_bucket, second["manifest_key"]))["index"]]
    assert not (set(index_after["packs"]) & shared)
    # Same pieces, new places: the upload still verifies to the last byte and opens.
    pieces = lambda ix: {n: [p[0] for p in f["pieces"]] for n, f in ix["files"].items()}  # noqa: E731
    assert pieces(index_after) == pieces(index_before)
    check = anyio.run(lambda: verify_uploads(config, read_data="100%", open_databases=True))
    assert check.ok, check.uploads[0].problems
    # Nothing left to do.
    again = _prune(config, repack_below=0.5)
    assert again.deleted == [] and again.repacked == []


def test_prune_refuses_when_a_kept_upload_already_lacks_an_object(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    config = s3_config()
    result = _sync(config)
    pack = next(iter(_index_of(minio_client, s3_bucket, result["manifest_key"])["packs"]
                     .values()))["key"]
    minio_client.remove_object(s3_bucket, pack)
    before = _keys(minio_client, s3_bucket)
    out = _cli(write_toml(config, tmp_path / "c.toml"), "prune")
    assert out.returncode == 1
    assert "refusing to prune" in out.stderr
    assert f"upload {result['upload_id']} needs {pack}" in out.stderr
    assert _keys(minio_client, s3_bucket) == before


def test_a_damaged_manifest_fails_verify_and_stops_prune_deleting_its_upload(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    config = s3_config()
    first = _sync(config)
    add_conversations(sample.data_dir, 3, seed=12, checkpoint=True)
    second = _sync(config)
    key = second["manifest_key"]
    # The newest manifest truncated, and its claim gone (as for every upload older
    # than the in-flight grace): before, prune swept it as an abandoned folder.
    body = get_object(minio_client, s3_bucket, key)
    _put(minio_client, s3_bucket, key, body[: len(body) // 3])
    minio_client.remove_object(s3_bucket, key.replace("manifest.json", "_claim.json"))
    path = write_toml(config, tmp_path / "c.toml")

    # verify's default is the newest upload, as restore's: the damaged one, not the one before.
    out = _cli(path, "verify", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert [u["upload_id"] for u in report["uploads"]] == [second["upload_id"]]
    assert report["uploads"][0]["problems"][0].startswith(
        f"upload {second['upload_id']}: {key}: manifest.json does not parse")

    before = _keys(minio_client, s3_bucket)
    for args in (("prune", "--dry-run"), ("prune",)):
        out = _cli(path, *args)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "refusing to prune" in out.stderr
        assert f"upload {second['upload_id']}: {key} is damaged" in out.stderr
        assert "delete that manifest.json" in out.stderr
    assert _keys(minio_client, s3_bucket) == before
    # Mended, the upload restores; nothing of it went.
    _put(minio_client, s3_bucket, key, body)
    out = _cli(path, "restore", second["upload_id"], "--to", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert first["upload_id"] != second["upload_id"]


def test_prune_leaves_the_plan_while_an_older_upload_is_in_flight(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    from akosha_sync.repository.prune import plan_key, read_condemned
    from akosha_sync.repository.store import make_store

    config = s3_config()
    _sync(config)
    add_conversations(sample.data_dir, 5, seed=3, checkpoint=True)
    _sync(config)
    anyio.run(lambda: forget_uploads(config, Policy(keep_last=1), dry_run=False))
    flying = "systems/test-host/uploads/20990101_000000_test-host"
    _put(minio_client, s3_bucket, f"{flying}/_claim.json", b"{}")
    before = _keys(minio_client, s3_bucket)

    report = _prune(config, repack_below=1.0, wait_seconds=0)
    assert report.waited_for == ["20990101_000000_test-host"]
    assert report.deleted == [] and "had not committed after 0 s" in report.notes[0]
    after = _keys(minio_client, s3_bucket)
    assert before <= after and plan_key("test-host") in after
    # A sync starting now reads the plan and reuses none of the condemned packs.
    condemned = anyio.run(lambda: read_condemned(make_store(config), "test-host"))
    assert condemned and all(k in before for k in condemned)
    add_conversations(sample.data_dir, 1, seed=4, checkpoint=True)
    third = _sync(config)
    used = {r["key"] for r in _index_of(minio_client, s3_bucket, third["manifest_key"])
            ["packs"].values()}
    assert not (used & condemned)


def _garbage_and_a_claim_in_flight(
    config: AkoshaSyncConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo
) -> None:
    """A forgotten upload's leftover to delete, and an upload in flight prune must wait
    for (its claim is younger than the plan will be)."""
    _sync(config)
    _put(minio_client, s3_bucket, "systems/test-host/uploads/20200101_000000_test-host/"
         "memories.json", b"[]")
    flying = "systems/test-host/uploads/20990101_000000_test-host"
    _put(minio_client, s3_bucket, f"{flying}/_claim.json", b"{}")


def test_prune_says_it_waits_and_a_sigterm_gives_up_its_lease(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    from akosha_sync.repository.prune import lease_key, plan_key

    config = s3_config()
    _garbage_and_a_claim_in_flight(config, minio_client, s3_bucket, sample)
    path = write_toml(config, tmp_path / "c.toml")
    dry = _cli(path, "prune", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would first wait for uploads in flight: 20990101_000000_test-host" in dry.stdout
    assert ("  delete systems/test-host/uploads/20200101_000000_test-host/memories.json"
            in dry.stdout)
    err = tmp_path / "prune.err"
    with err.open("w") as sink:
        proc = subprocess.Popen([EXE, "--config", str(path), "prune"], stdout=subprocess.PIPE,
                                stderr=sink, text=True)
    try:
        until(lambda: "prune: waiting for 1 upload(s)" in err.read_text(), timeout=60,
              what="prune's notice that it waits")
        assert lease_key("test-host") in _keys(minio_client, s3_bucket)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143  # 128 + SIGTERM, as shells report it
    finally:
        proc.kill()
        proc.wait()
    # Interrupted like Ctrl-C: the lease is given back (it refused every prune for 30
    # minutes), and the plan too (it made every sync store its pieces again).
    keys = _keys(minio_client, s3_bucket)
    assert lease_key("test-host") not in keys and plan_key("test-host") not in keys
    assert "Interrupting is safe" in err.read_text()


def test_forget_prune_reports_the_forget_when_the_prune_is_refused(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    from akosha_sync.repository.prune import lease_key

    config = s3_config()
    first = _sync(config)
    add_conversations(sample.data_dir, 2, seed=5, checkpoint=True)
    _sync(config)
    _put(minio_client, s3_bucket, lease_key("test-host"), b"{}")  # another prune runs
    path = write_toml(config, tmp_path / "c.toml")
    out = _cli(path, "forget", "--keep-last", "1", "--prune", "--json")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["forget"]["forgotten"] == [first["upload_id"]]
    assert report["prune"] is None
    assert "another prune holds the lease" in report["prune_error"]
    add_conversations(sample.data_dir, 1, seed=6, checkpoint=True)
    _sync(config)
    out = _cli(path, "forget", "--keep-last", "1", "--prune")
    assert out.returncode == 1
    assert "forgot 1 of 2 uploads" in out.stdout
    assert "the forget is done, the prune failed: another prune holds the lease" in out.stderr


def test_prune_and_syncs_concurrently_never_leave_a_manifest_pointing_at_a_deleted_object(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """The race: a sync that planned to reuse a pack (read before prune's plan) commits
    after prune condemned that pack; another sync starts after the plan, while the old
    indexes still point at that pack. The seams: the first sync's own progress callback
    holds it just before its manifest is written; prune's on_planned holds prune."""
    import threading

    from akosha_sync.repository.service import verify_uploads

    config = s3_config()
    first = _sync(config)
    add_conversations(sample.data_dir, 5, seed=3, checkpoint=True)
    second = _sync(config)
    shared = set(_index_of(minio_client, s3_bucket, first["manifest_key"])["packs"]) & set(
        _index_of(minio_client, s3_bucket, second["manifest_key"])["packs"])
    assert shared
    anyio.run(lambda: forget_uploads(config, Policy(keep_last=1), dry_run=False))
    add_conversations(sample.data_dir, 2, seed=5, checkpoint=True)

    paused, resume, planned = threading.Event(), threading.Event(), threading.Event()
    go_on = threading.Event()

    def on_planned() -> None:
        # Hold prune between its plan and its index rewrite while the fresh sync runs.
        planned.set()
        go_on.wait(60)

    results: dict[str, Any] = {}

    def hold(phase: str, done: int, total: int) -> None:
        if phase == "manifest" and not paused.is_set():
            paused.set()
            resume.wait(60)

    def slow_sync() -> None:
        method = CloudSyncMethod(config)
        results["slow"] = anyio.run(lambda: method.sync(progress=hold))

    def on_prune_progress(phase: str, done: int, total: int) -> None:
        if phase == "prune:wait":  # prune now waits for the held sync: let it commit
            resume.set()

    def pruner() -> None:
        try:
            results["prune"] = _prune(config, repack_below=1.0, wait_seconds=60,
                                      on_planned=on_planned, progress=on_prune_progress)
        except BaseException as exc:  # reported by the assertion below
            results["prune"] = exc

    slow = threading.Thread(target=slow_sync)
    slow.start()
    assert paused.wait(60), "the slow sync reached its commit"
    prune_thread = threading.Thread(target=pruner)
    prune_thread.start()
    try:
        assert planned.wait(60), "prune wrote its plan"
        condemned_packs = {
            k.rsplit("/", 1)[-1].removesuffix(".pack")
            for k in json.loads(get_object(minio_client, s3_bucket,
                                           "systems/test-host/locks/prune-plan.json"))[
                "condemned"]
        }
        assert shared <= condemned_packs
        # A sync that starts after the plan: it stores those pieces again.
        add_conversations(sample.data_dir, 1, seed=6, checkpoint=True)
        fresh = _sync(config)
        assert fresh["success"]
        assert not (set(_index_of(minio_client, s3_bucket, fresh["manifest_key"])["packs"])
                    & condemned_packs)
    finally:
        go_on.set()
        prune_thread.join(120)
        resume.set()  # only matters when prune did not wait (the failure this test catches)
        slow.join(120)
    assert results["slow"]["success"], results["slow"]
    report = results["prune"]
    assert not isinstance(report, BaseException), report
    slow_packs = set(_index_of(minio_client, s3_bucket, results["slow"]["manifest_key"])
                     ["packs"])
    assert shared & slow_packs, "the slow sync did reuse the condemned pack"
    # Every remaining upload is whole, to the last byte.
    check = anyio.run(lambda: verify_uploads(config, all_uploads=True, read_data="100%"))
    assert check.ok, [p for u in check.uploads for p in u.problems]
    assert len(check.uploads) == 3
    assert results["slow"]["upload_id"] in report.waited_for


def test_prune_removes_abandoned_folders_after_the_grace_and_respects_a_lease(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    from akosha_sync.repository.prune import PruneError, lease_key

    config = s3_config()
    _sync(config)
    dead = "systems/test-host/uploads/20200101_000000_test-host"
    _put(minio_client, s3_bucket, f"{dead}/_claim.json", b"{}")
    _put(minio_client, s3_bucket, f"{dead}/memories.json", b"[]")
    # Within the grace period it is an upload in flight: kept. With nothing else to
    # delete, prune does not wait for it either (a killed sync's claim held it up 15 min).
    kept = _prune(config, wait_seconds=0)
    assert kept.deleted == [] and kept.waited_for == [] and kept.notes == []
    assert _keys(minio_client, s3_bucket, dead) == {f"{dead}/_claim.json",
                                                    f"{dead}/memories.json"}
    # Past it (a grace of zero here), the folder is abandoned and goes.
    gone = _prune(config, in_flight_stale=timedelta(0))
    assert sorted(gone.deleted) == [f"{dead}/_claim.json", f"{dead}/memories.json"]
    assert not _keys(minio_client, s3_bucket, dead)
    # Another prune's fresh lease: refused, nothing touched.
    _put(minio_client, s3_bucket, lease_key("test-host"), b"{}")
    before = _keys(minio_client, s3_bucket)
    with pytest.raises(PruneError, match="another prune holds the lease"):
        _prune(config)
    assert _keys(minio_client, s3_bucket) == before
    # The command says so as it is, not as a failure of the store.
    out = _cli(write_toml(config, tmp_path / "c.toml"), "prune")
    assert out.returncode == 1
    assert out.stderr.startswith("akosha-sync prune: another prune holds the lease"), out.stderr
    assert _keys(minio_client, s3_bucket) == before
    # A lease older than its staleness (zero here) belonged to a prune that died.
    _prune(config, lease_stale=timedelta(0))
    assert lease_key("test-host") not in _keys(minio_client, s3_bucket)


def test_a_prune_whose_lease_was_taken_over_deletes_nothing_and_not_the_others_plan(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
) -> None:
    """Prune A is held up past its lease's life (a laptop asleep after writing its
    plan); prune B takes the stale lease over and writes its own plan. Before, A then
    swept, and deleted B's plan and lease: a sync reading no plan could reuse what B
    condemned, and B deleted it under the sync's committed upload. Now A finds the
    lease is not its own any more and stops: nothing deleted, B's lease and plan kept."""
    from akosha_sync.repository.prune import PruneError, lease_key, plan_key

    config = s3_config()
    _sync(config)
    dead = "systems/test-host/uploads/20200101_000000_test-host"
    _put(minio_client, s3_bucket, f"{dead}/memories.json", b"[]")  # garbage for A
    others = {lease_key("test-host"): b'{"host": "b", "token": "b-token"}',
              plan_key("test-host"): b'{"host": "b", "condemned": [], "token": "b-token"}'}

    def taken_over() -> None:  # what prune B writes while A is held up
        for key, body in others.items():
            _put(minio_client, s3_bucket, key, body)

    with pytest.raises(PruneError, match="taken over by another prune"):
        _prune(config, on_planned=taken_over)
    assert f"{dead}/memories.json" in _keys(minio_client, s3_bucket, dead)
    for key, body in others.items():
        assert get_object(minio_client, s3_bucket, key) == body


def test_prune_keeps_the_check_record_of_an_upload_made_while_it_ran(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    """With nothing to delete, prune still removes the check records of uploads gone;
    before, it went by its first scan, and removed the record of an upload committed
    (and verified) after it."""
    import threading

    from akosha_sync.repository.checks import checks_prefix

    config = s3_config(export_memories=False)
    _sync(config)
    made: list[dict[str, Any]] = []

    def meanwhile(phase: str, done: int, total: int) -> None:
        if phase == "prune:repack" and not made:  # after the scan: another process syncs
            add_conversations(sample.data_dir, 2, seed=9, checkpoint=True)
            worker = threading.Thread(target=lambda: made.append(_sync(config)))
            worker.start()
            worker.join()
            record = f"{checks_prefix('test-host')}{made[0]['upload_id']}.json"
            _put(minio_client, s3_bucket, record, b'{"level": "open", "ok": true}')

    report = _prune(config, progress=meanwhile)
    assert made and made[0]["success"], made
    assert report.deleted == []
    assert f"{checks_prefix('test-host')}{made[0]['upload_id']}.json" in _keys(
        minio_client, s3_bucket)


def test_forget_prune_files_layout_keeps_objects_later_uploads_reuse(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    config = s3_config(storage_layout="files")
    first = _sync(config)
    add_conversations(sample.data_dir, 2, seed=8)  # only the WAL changes
    second = _sync(config)
    details = json.loads(get_object(minio_client, s3_bucket, second["manifest_key"]))[
        "file_details"]
    needed = {d["key"] for d in details.values()}
    folder = f"systems/test-host/uploads/{first['upload_id']}/"
    assert needed & _keys(minio_client, s3_bucket, folder), "the second reuses the first's"
    before = _keys(minio_client, s3_bucket)
    out = _cli(write_toml(config, tmp_path / "c.toml"), "forget", "--keep-last", "1", "--prune",
               "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["forget"]["forgotten"] == [first["upload_id"]]
    # Everything of the first upload goes, except what the second still uses.
    expected = {k for k in before if k.startswith(folder)} - needed
    assert expected and before - _keys(minio_client, s3_bucket) == expected
    assert set(report["prune"]["deleted"]) == expected - set(report["forget"]["deleted_keys"])
    # The first folder stays, holding what the second reuses; listed as forgotten.
    infos = anyio.run(lambda: snapshots(config))
    assert [(i.upload_id, i.complete) for i in infos] == [
        (first["upload_id"], False), (second["upload_id"], True)]
    assert infos[0].problem == ("leftover of a forgotten upload; it holds only files that "
                                "later uploads reuse, kept while they need them")
    listed = _cli(write_toml(config, tmp_path / "c.toml"), "snapshots").stdout
    row = next(line for line in listed.splitlines() if line.startswith(first["upload_id"]))
    assert "leftover of a forgotten upload" in row and "INCOMPLETE" not in row, listed


def test_forget_never_removes_the_newest_upload_that_passed_verify_open(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    from akosha_sync.repository.service import verify_uploads

    config = s3_config()
    ids = []
    for seed in range(3):
        add_conversations(sample.data_dir, 1, seed=60 + seed, checkpoint=True)
        ids.append(_sync(config)["upload_id"])
    assert anyio.run(lambda: verify_uploads(config, upload_id=ids[1], open_databases=True)).ok
    # A later structure-only check does not undo the record of the open check.
    assert anyio.run(lambda: verify_uploads(config, upload_id=ids[1])).ok
    report = anyio.run(lambda: forget_uploads(config, Policy(keep_last=1), dry_run=False))
    assert report.forgotten == [ids[0]]
    kept = {d.upload_id: d.reasons for d in report.decisions if d.keep}
    assert kept[ids[1]] == ["newest upload that passed verify --open (always kept)"]
    assert {m.split("/")[3] for m in manifests(minio_client, s3_bucket)} == set(ids[1:])


def test_forget_keeps_the_last_upload_holding_a_database_that_went_missing(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """reflection.duckdb lost on the machine: the next syncs commit the knowledge graph
    only, and a daemon's keep_last=2 forgot every upload holding the reflections (prune
    then deleted their data)."""
    config = s3_config()
    holder = _sync(config)["upload_id"]
    sample.reflection_path.rename(tmp_path / "reflection.duckdb")
    for wal in sample.data_dir.glob("reflection.duckdb*.wal"):
        wal.rename(tmp_path / wal.name)
    later = [_sync(config) for _ in range(2)]
    for result in later:
        manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
        assert manifest["metadata"]["missing_databases"] == ["reflection.duckdb"]
        assert "reflection.duckdb" not in manifest["file_details"]

    report = anyio.run(lambda: forget_uploads(config, Policy(keep_last=1), dry_run=False))
    assert report.forgotten == [later[0]["upload_id"]]
    kept = {d.upload_id: d.reasons for d in report.decisions if d.keep}
    assert kept[holder] == ["newest upload holding reflection.duckdb (always kept)"]
    remaining = {m.split("/")[3] for m in manifests(minio_client, s3_bucket)}
    assert remaining == {holder, later[1]["upload_id"]}
    assert f"systems/test-host/uploads/{holder}/manifest.json" in _keys(minio_client, s3_bucket)


def test_prune_of_a_system_with_nothing_in_the_bucket_writes_nothing(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
) -> None:
    """A mistyped --system used to leave a lease and a clock probe behind."""
    config = s3_config()
    _sync(config)
    before = _keys(minio_client, s3_bucket, prefix="")
    report = anyio.run(lambda: prune_unused(config, system_id="ghost", dry_run=False))
    assert report.deleted == [] and report.errors == []
    assert any("nothing to prune" in n for n in report.notes), report.notes
    assert _keys(minio_client, s3_bucket, prefix="") == before


def test_forget_by_id_removes_exactly_the_uploads_named_and_unblocks_prune(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
    tmp_path: Path,
) -> None:
    """A damaged upload between good ones blocks prune; no --keep-* policy can remove it
    without the good older ones: forget takes upload ids, as restic's does."""
    config = s3_config(export_memories=False)
    ids = []
    for seed in range(3):
        add_conversations(sample.data_dir, 2, seed=60 + seed, checkpoint=True)
        ids.append(_sync(config)["upload_id"])
    # The middle one loses its index: prune refuses while it is there.
    _put(minio_client, s3_bucket, f"systems/test-host/uploads/{ids[1]}/index.json", b"{")
    toml = write_toml(config, tmp_path / "c.toml")
    assert _cli(toml, "prune", "--dry-run").returncode == 1
    both = _cli(toml, "forget", ids[1], "--keep-last", "1")
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr
    unknown = _cli(toml, "forget", "20200101_000000_test-host")
    assert unknown.returncode == 1 and "no such committed upload" in unknown.stderr
    assert "request failed" not in unknown.stderr

    out = _cli(toml, "forget", ids[1], "--prune")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"forget {ids[1]}" in out.stdout and "forgot 1 of 3 uploads" in out.stdout
    assert {m.split("/")[3] for m in manifests(minio_client, s3_bucket)} == {ids[0], ids[2]}
    assert restore_problems(minio_client, s3_bucket) == []
    # Each upload is dated by its id (the sync's start), as restore --at compares.
    infos = anyio.run(lambda: snapshots(config))
    for info in infos:
        i = info.upload_id
        assert info.time == f"{i[:4]}-{i[4:6]}-{i[6:8]}T{i[9:11]}:{i[11:13]}:{i[13:15]}Z"
        assert info.committed_at and info.committed_at >= info.time[:19]
