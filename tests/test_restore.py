"""Restore from a real SeaweedFS: blocks layout, files layout, old uploads; failures
leave the target as it was. Bucket contents are checked and damaged with minio."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.restore import RestoreError, RestoreResult, restore
from akosha_sync.repository.store import make_store
from akosha_sync.sample import SampleInfo, add_conversations
from akosha_sync.sync.cloud import CloudSyncMethod
from support.process import hold_open_in_duckdb, let_go
from support.verify import get_object

MakeConfig = Callable[..., AkoshaSyncConfig]
_EXE = str(Path(sys.executable).with_name("akosha-sync"))


def _sync(config: AkoshaSyncConfig, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = anyio.run(CloudSyncMethod(config, **kwargs).sync)
    assert result["success"], result["error"]
    return result


def _restore(config: AkoshaSyncConfig, target: Path, **kwargs: Any) -> RestoreResult:
    kwargs.setdefault("system_id", config.system_id_resolved)
    return anyio.run(lambda: restore(make_store(config), config, target=target, **kwargs))


def _toml(config: AkoshaSyncConfig, path: Path) -> Path:
    keys = ("cloud_bucket", "cloud_endpoint", "system_id", "data_dir", "state_dir", "log_file",
            "access_key_id", "secret_access_key", "storage_layout")
    path.write_text("".join(f'{k} = "{getattr(config, k)}"\n' for k in keys) + "max_retries = 1\n")
    return path


def _cli(toml: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_EXE, "--config", str(toml), "restore", *args], capture_output=True,
                          text=True, timeout=120, check=False, env={"PATH": "/usr/bin:/bin"})


def _snapshot_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _manifest(client: Minio, bucket: str, result: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(get_object(client, bucket, result["manifest_key"]))
    return data


def _index(client: Minio, bucket: str, result: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        get_object(client, bucket, _manifest(client, bucket, result)["index"]))
    return data


def _rows(path: Path, table: str = "conversations_v2") -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0]) if row else -1
    finally:
        con.close()


def test_cli_round_trip_is_byte_identical_database_and_wal(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path, minio_client: Minio,
    s3_bucket: str,
) -> None:
    config = s3_config()
    result = _sync(config)
    manifest = _manifest(minio_client, s3_bucket, result)
    assert manifest["storage_layout"] == "blocks"
    index = _index(minio_client, s3_bucket, result)
    assert sorted(index["files"]) == ["knowledge_graph.duckdb", "reflection.duckdb",
                                      "reflection.duckdb.wal"]
    for pack_id, ref in index["packs"].items():  # every pack is there and is its own id
        assert hashlib.sha256(get_object(minio_client, s3_bucket, ref["key"])).hexdigest() == (
            pack_id)
    target = tmp_path / "restored"
    out = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["upload_id"] == result["upload_id"] and report["system_id"] == "test-host"
    assert report["bytes_downloaded"] == sum(r["size"] for r in index["packs"].values())
    assert report["duration_seconds"] >= 0
    for name in ("reflection.duckdb", "reflection.duckdb.wal", "knowledge_graph.duckdb"):
        restored = (target / name).read_bytes()
        assert restored == (sample.data_dir / name).read_bytes(), name
        entry = next(f for f in report["files"] if f["name"] == name)
        assert entry["size"] == len(restored)
        assert entry["sha256"] == hashlib.sha256(restored).hexdigest()
    assert sorted(p.name for p in target.iterdir()) == [
        "knowledge_graph.duckdb", "reflection.duckdb", "reflection.duckdb.wal"]  # no temp left
    # The WAL-only rows come back: DuckDB replays the restored WAL.
    assert _rows(target / "reflection.duckdb") == sample.row_counts["conversations_v2"]


def test_dry_run_prints_the_plan_and_changes_nothing(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config()
    _sync(config)
    target = tmp_path / "dry"
    out = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "would restore" in out.stdout and "reflection.duckdb.wal" in out.stdout
    assert "to download:" in out.stdout
    assert not target.exists()


def test_point_in_time_restore_picks_the_newest_at_or_before(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    base = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    states: list[bytes] = []
    for hour in range(3):
        if hour:
            add_conversations(sample.data_dir, 5, seed=hour, checkpoint=True)
        _sync(config, clock=lambda h=hour: base + timedelta(hours=h))
        states.append(sample.reflection_path.read_bytes())
    assert len(set(states)) == 3
    got = _restore(config, tmp_path / "t1", at=base + timedelta(hours=1, minutes=30))
    assert got.upload_id == "20261125_130000_test-host"
    assert (tmp_path / "t1" / "reflection.duckdb").read_bytes() == states[1]
    first = _restore(config, tmp_path / "t0", upload_id="20261125_120000_test-host")
    assert (tmp_path / "t0" / "reflection.duckdb").read_bytes() == states[0]
    assert first.upload_id == "20261125_120000_test-host"
    # Too early: the error names the oldest upload, so the user knows what --at can be.
    with pytest.raises(
        RestoreError, match=r"at or before 2026-11-24T12:00:00Z.*its oldest is 20261125_120000"
    ):
        _restore(config, tmp_path / "none", at=base - timedelta(days=1))
    assert not (tmp_path / "none").exists()


def test_restore_another_systems_upload(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    _sync(s3_config(system_id="old-laptop", export_memories=False))
    new_laptop = s3_config(system_id="new-laptop", data_dir=str(tmp_path / "fresh"))
    # Without --system: the new machine has no upload; the error names the old one.
    out = _cli(_toml(new_laptop, tmp_path / "c.toml"))
    assert out.returncode == 1
    assert "no upload of system 'new-laptop'" in out.stderr
    assert "Systems in the bucket: old-laptop;" in out.stderr
    assert "--system old-laptop" in out.stderr
    assert not (tmp_path / "fresh").exists()
    out = _cli(_toml(new_laptop, tmp_path / "c.toml"), "--system", "old-laptop", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["system_id"] == "old-laptop"
    # Default target: the new machine's data_dir.
    assert (tmp_path / "fresh" / "reflection.duckdb").read_bytes() == (
        sample.reflection_path.read_bytes())


def _existing_target(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    target = tmp_path / "target"
    target.mkdir()
    (target / "reflection.duckdb").write_bytes(b"the user's own database")
    (target / "notes.txt").write_text("unrelated")
    return target, _snapshot_of(target)


def test_corrupted_piece_fails_naming_the_pack_and_leaves_target(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    result = _sync(config)
    index = _index(minio_client, s3_bucket, result)
    piece = index["files"]["reflection.duckdb"]["pieces"][3]
    key = index["packs"][piece[1]]["key"]
    data = bytearray(get_object(minio_client, s3_bucket, key))
    data[piece[2] + piece[3] // 2] ^= 0xFF  # one flipped byte inside that piece
    import io

    minio_client.put_object(s3_bucket, key, io.BytesIO(bytes(data)), len(data))
    target, before = _existing_target(tmp_path)
    with pytest.raises(RestoreError) as info:
        _restore(config, target, force=True)
    assert key in str(info.value)
    assert _snapshot_of(target) == before and sorted(p.name for p in target.iterdir()) == [
        "notes.txt", "reflection.duckdb"]


def test_damage_that_still_decompresses_is_caught_by_the_whole_file_hash(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    """Restore hashes whole files rather than each piece: a piece replaced by another
    valid zstd frame of the right length must still fail, naming its pack."""
    import io

    import zstandard

    config = s3_config(export_memories=False)
    result = _sync(config)
    index = _index(minio_client, s3_bucket, result)
    pieces = index["files"]["reflection.duckdb"]["pieces"]
    piece = next(p for p in pieces[1:] if p[5] == "zstd")
    key = index["packs"][piece[1]]["key"]
    forged = zstandard.ZstdCompressor().compress(b"x" * piece[4])
    assert len(forged) < piece[3]  # fits in the piece's place; the rest stays as it was
    data = bytearray(get_object(minio_client, s3_bucket, key))
    data[piece[2] : piece[2] + len(forged)] = forged
    minio_client.put_object(s3_bucket, key, io.BytesIO(bytes(data)), len(data))
    target, before = _existing_target(tmp_path)
    with pytest.raises(RestoreError, match="does not match its SHA-256") as info:
        _restore(config, target, force=True)
    assert key in str(info.value) and piece[0][:16] in str(info.value)
    assert _snapshot_of(target) == before and sorted(p.name for p in target.iterdir()) == [
        "notes.txt", "reflection.duckdb"]


def test_deleted_pack_fails_naming_it_and_leaves_target(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    result = _sync(config)
    index = _index(minio_client, s3_bucket, result)
    key = next(iter(index["packs"].values()))["key"]
    minio_client.remove_object(s3_bucket, key)
    target, before = _existing_target(tmp_path)
    # The dry run asks the bucket too: it must not promise a restore that cannot be.
    dry = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target), "--force", "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert f"problem: {key} is missing from the bucket" in dry.stdout, dry.stdout
    out = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target), "--force")
    assert out.returncode == 1
    assert key in out.stderr and "missing" in out.stderr
    assert _snapshot_of(target) == before and len(list(target.iterdir())) == 2


def test_existing_database_refused_without_force_kept_as_bak_with_it(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    target, before = _existing_target(tmp_path)
    (target / "reflection.duckdb.wal").write_bytes(b"an old WAL")
    with pytest.raises(RestoreError, match="--force"):
        _restore(config, target)
    assert _snapshot_of(target) == {**before, "reflection.duckdb.wal": b"an old WAL"}
    now = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
    result = _restore(config, target, force=True, now=now)
    bak = target / "reflection.duckdb.bak-20261130T080000Z"
    assert bak.read_bytes() == b"the user's own database"
    assert (target / "reflection.duckdb.wal.bak-20261130T080000Z").read_bytes() == b"an old WAL"
    assert (target / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()
    assert (target / "reflection.duckdb.wal").read_bytes() == (
        sample.reflection_wal_path.read_bytes())
    assert next(f for f in result.files if f.name == "reflection.duckdb").backup == str(bak)
    # Again within the same second: the first backup (the user's own database) is never
    # overwritten; the file this restore replaces is kept beside it under another name.
    again = _restore(config, target, force=True, now=now)
    assert bak.read_bytes() == b"the user's own database"
    kept = next(f for f in again.files if f.name == "reflection.duckdb").backup
    assert kept is not None and kept != str(bak)
    assert Path(kept).read_bytes() == sample.reflection_path.read_bytes()
    assert (target / "reflection.duckdb.wal.bak-20261130T080000Z").read_bytes() == b"an old WAL"


def test_a_stale_wal_is_moved_aside_when_the_upload_has_none(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    """DuckDB would replay a WAL left from the old database into the restored one."""
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    (target / "knowledge_graph.duckdb.wal").write_bytes(b"a WAL of another database")
    with pytest.raises(RestoreError, match=r"knowledge_graph\.duckdb\.wal"):
        _restore(config, target)
    # The dry run and the result both say so (it was done without a word).
    dry = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target), "--force", "--dry-run")
    assert "knowledge_graph.duckdb.wal: to be set aside as knowledge_graph.duckdb.wal.bak-" in (
        dry.stdout), dry.stdout
    now = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
    done = _restore(config, target, force=True, now=now)
    assert [(f.name, f.backup) for f in done.set_aside] == [
        ("knowledge_graph.duckdb.wal",
         str(target / "knowledge_graph.duckdb.wal.bak-20261130T080000Z"))]
    assert not (target / "knowledge_graph.duckdb.wal").exists()
    assert (target / "knowledge_graph.duckdb.wal.bak-20261130T080000Z").read_bytes() == (
        b"a WAL of another database")
    assert (target / "knowledge_graph.duckdb").read_bytes() == (
        sample.knowledge_graph_path.read_bytes())
    assert _rows(target / "knowledge_graph.duckdb", "kg_entities") == sample.row_counts[
        "kg_entities"]


def test_database_open_for_writing_is_refused_even_with_force(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "live"
    target.mkdir()
    live = target / "reflection.duckdb"
    holder = hold_open_in_duckdb(live)
    try:
        before = _snapshot_of(target)
        with pytest.raises(RestoreError) as info:
            _restore(config, target, force=True)
        message = str(info.value)
        assert str(live) in message and "running process" in message
        assert _snapshot_of(target) == before
    finally:
        let_go(holder)


def test_files_layout_and_uploads_from_before_the_blocks_layout_restore(
    s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    config = s3_config(storage_layout="files")
    result = _sync(config)
    manifest = _manifest(minio_client, s3_bucket, result)
    assert manifest["storage_layout"] == "files" and manifest["index"] is None
    got = _restore(config, tmp_path / "files")
    assert got.storage_layout == "files"
    for name in ("reflection.duckdb", "reflection.duckdb.wal", "knowledge_graph.duckdb"):
        assert (tmp_path / "files" / name).read_bytes() == (sample.data_dir / name).read_bytes()
    # An upload written before this change has no storage_layout / index / bytes_new.
    import io

    for field in ("storage_layout", "index", "bytes_new"):
        manifest.pop(field)
    for entry in manifest["file_details"].values():
        for field in ("pieces", "new_pieces", "row_counts"):
            entry.pop(field)
    body = json.dumps(manifest).encode()
    minio_client.put_object(s3_bucket, result["manifest_key"], io.BytesIO(body), len(body))
    old = _restore(config, tmp_path / "old")
    assert old.storage_layout == "files"
    assert (tmp_path / "old" / "reflection.duckdb").read_bytes() == (
        sample.reflection_path.read_bytes())


def test_damaged_whole_object_in_files_layout_fails_naming_it(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    import io

    config = s3_config(storage_layout="files", export_memories=False)
    result = _sync(config)
    key = _manifest(minio_client, s3_bucket, result)["file_details"]["reflection.duckdb"]["key"]
    data = bytearray(get_object(minio_client, s3_bucket, key))
    data[len(data) // 2] ^= 0x01
    minio_client.put_object(s3_bucket, key, io.BytesIO(bytes(data)), len(data))
    target, before = _existing_target(tmp_path)
    with pytest.raises(RestoreError) as info:
        _restore(config, target, force=True)
    assert key in str(info.value)
    assert _snapshot_of(target) == before


def test_whole_file_hash_follows_pieces_written_out_of_order(tmp_path: Path) -> None:
    """Packs finish in any order: pieces written ahead of the hash are read back when
    the gap closes, and the digest is the file's."""
    import os
    import random

    from akosha_sync.repository.format import Piece
    from akosha_sync.repository.restore import PlannedFile, _WholeFile

    blobs = [os.urandom(random.Random(i).randint(1, 5000)) for i in range(12)]
    content = b"".join(blobs)
    placed, offset = [], 0
    for blob in blobs:
        sha = hashlib.sha256(blob).hexdigest()
        placed.append((Piece(sha, "p", 0, len(blob), len(blob), "raw"), offset, "packs/p"))
        offset += len(blob)
    planned = PlannedFile(name="f", path=str(tmp_path / "f"), size=len(content),
                          sha256=hashlib.sha256(content).hexdigest(), replaces=False)
    order = list(range(len(blobs)))
    random.Random(7).shuffle(order)
    assert order[0] != 0  # the first piece written is ahead of the hash
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        whole = _WholeFile(fd, planned, placed)
        for i in order:
            whole.write(blobs[i], placed[i][1])
        whole.check()
        assert whole.hashed == len(content)
        damaged = _WholeFile(fd, planned, placed)
        for i in order:
            damaged.write(b"\0" * len(blobs[i]) if i == 5 else blobs[i], placed[i][1])
        with pytest.raises(RestoreError, match=r"in packs/p does not match its SHA-256"):
            damaged.check()
    finally:
        os.close(fd)


def test_packs_are_fetched_in_file_order_with_the_files_in_turn() -> None:
    """Each file's packs stay in order (its hash follows from memory) and the files
    alternate (their hashes advance side by side); a shared pack comes once."""
    from akosha_sync.repository.format import Piece
    from akosha_sync.repository.restore import _fetch_order

    def uses(*names: str) -> list[tuple[Piece, str, int]]:
        return [(Piece("s", "p", 0, 1, 1, "raw"), name, 0) for name in names]

    wanted = {"a1": uses("a"), "a2": uses("a"), "a3": uses("a", "b"),
              "b1": uses("b"), "b2": uses("b")}
    assert _fetch_order(wanted) == ["a1", "b1", "a2", "b2", "a3"]
    assert _fetch_order({}) == []


def test_a_target_that_is_not_a_folder_or_cannot_be_made_is_refused_before_any_download(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    toml = _toml(config, tmp_path / "c.toml")
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"kept")
    out = _cli(toml, "--to", str(a_file))
    assert out.returncode == 1
    assert f"{a_file} is a file, not a folder" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and a_file.read_bytes() == b"kept"
    # Not even root can write into /proc: refused up front, with what to do.
    out = _cli(toml, "--to", "/proc/akosha-sync-restore")
    assert out.returncode == 1
    assert "/proc" in out.stderr and "restore --to another folder" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "downloaded" not in out.stdout


def test_a_system_id_that_cannot_be_one_is_refused_by_name(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    toml = _toml(s3_config(), tmp_path / "c.toml")
    out = _cli(toml, "--system", "../etc", "--to", str(tmp_path / "t"))
    assert out.returncode == 1
    assert "'../etc' is not a system id" in out.stderr, out.stderr
    assert "cloud storage request failed" not in out.stderr
    assert not (tmp_path / "t").exists()


def test_arguments_that_name_nothing_or_two_things_are_refused_by_name(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    toml = _toml(s3_config(), tmp_path / "c.toml")
    target = str(tmp_path / "t")
    cases = [
        # (arguments, exit code, what stderr must say)
        (["--system", "", "--to", target], 1, "'' is not a system id"),
        (["--to", ""], 2, "--to is empty"),
        (["..", "--to", target], 1, "'..' is not an upload id"),
        (["20261125_120000_test-host", "--at", "2026-11-25T12:00", "--to", target], 1,
         "give one"),
        (["--at", "9999-12-31T23:59:59-05:00", "--to", target], 2, "is not an ISO time"),
        # Another machine's id: the error says which --system it names.
        (["20261125_120000_old-laptop.2", "--to", target], 1,
         "Its id names system 'old-laptop': restore it with --system old-laptop."),
    ]
    for args, code, said in cases:
        out = _cli(toml, *args)
        assert (out.returncode, said in out.stderr) == (code, True), (args, out.stderr)
        assert "Traceback" not in out.stderr and "request failed" not in out.stderr
    assert not (tmp_path / "t").exists()


def test_too_little_free_space_is_refused_before_any_download(tmp_path: Path) -> None:
    from akosha_sync.repository.restore import target_folder_problem

    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize
    assert target_folder_problem(tmp_path / "new" / "folder", 1024) is None
    problem = target_folder_problem(tmp_path / "new" / "folder", free + 1024**3)
    assert problem is not None and f"in {tmp_path}, which has" in problem, problem


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_a_disk_that_fills_during_the_restore_fails_cleanly_and_leaves_the_target(
    s3_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """The fault (ENOSPC from the filesystem after some bytes) is injected at the write:
    nothing else here can run out of disk on demand."""
    config = s3_config(export_memories=False, storage_layout=layout)
    _sync(config)
    target, before = _existing_target(tmp_path)
    written = 0
    real_pwrite, real_write = os.pwrite, os.write

    def full(count: int) -> None:
        nonlocal written
        written += count
        if written > 2 * 1024 * 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def pwrite(fd: int, data: Any, offset: int) -> int:
        full(len(data))
        return real_pwrite(fd, data, offset)

    def write(fd: int, data: Any) -> int:
        full(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(RestoreError, match=r"No space left on device.*nothing in it was replaced"):
        _restore(config, target, force=True)
    monkeypatch.undo()
    assert written > 2 * 1024 * 1024  # the fault did happen, during the writes
    assert _snapshot_of(target) == before  # no temp file left, nothing replaced


def test_a_rename_refused_midway_through_the_install_puts_the_target_back(
    s3_config: MakeConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault (a rename into place refused after the first file went in) is injected
    at ``os.replace``: a real permission change cannot be timed between two renames."""
    config = s3_config(export_memories=False)
    _sync(config)
    target, before = _existing_target(tmp_path)
    (target / "knowledge_graph.duckdb").write_bytes(b"the user's own graph")
    before = _snapshot_of(target)
    real_replace = os.replace
    into_place: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        if ".restore-" in str(src):
            into_place.append(str(dst))
            if len(into_place) == 2:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(RestoreError, match=r"Permission denied.*what was there is back as it was"):
        _restore(config, target, force=True)
    monkeypatch.undo()
    assert len(into_place) == 2  # one file was in place when the second was refused
    assert _snapshot_of(target) == before  # originals back, no backup or temp left


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_an_unreadable_database_is_kept_at_its_last_version_and_restore_says_so(
    layout: str, s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio,
    s3_bucket: str, tmp_path: Path,
) -> None:
    config = s3_config(storage_layout=layout)
    first = _sync(config)
    good = _snapshot_of(sample.data_dir)
    # The reflection database becomes unreadable (a disk error, a bad copy by hand).
    sample.reflection_path.write_bytes(b"not a database " * 4096)
    second: dict[str, Any] = anyio.run(CloudSyncMethod(config).sync)
    assert second["success"] is False and second["manifest_key"], second
    assert "not a readable DuckDB database" in second["error"]
    assert (f"reflection.duckdb in this upload is the version upload {first['upload_id']} "
            "stored") in second["error"]
    carried = _manifest(minio_client, s3_bucket, second)["metadata"]["carried_over"]
    assert carried == {"reflection.duckdb": first["upload_id"],
                       "reflection.duckdb.wal": first["upload_id"]}
    listed = subprocess.run([_EXE, "--config", str(_toml(config, tmp_path / "c.toml")),
                             "snapshots"], capture_output=True, text=True, check=True,
                            env={"PATH": "/usr/bin:/bin"}).stdout
    row = next(line for line in listed.splitlines() if line.startswith(second["upload_id"]))
    assert f"complete, reflection.duckdb as of {first['upload_id']};" in row, listed
    # The newest upload restores both databases, the unreadable one as it last was.
    target = tmp_path / "restored"
    out = _cli(_toml(config, tmp_path / "c.toml"), "--to", str(target))
    assert out.returncode == 0, out.stderr
    assert f"restored upload {second['upload_id']}" in out.stdout
    assert (f"note: reflection.duckdb is the version upload {first['upload_id']} stored: it "
            f"could not be read when {second['upload_id']} was made") in out.stdout
    assert _snapshot_of(target) == good
    # Mended, it is read again (its old fingerprint was kept): a full, successful upload.
    sample.reflection_path.write_bytes(good["reflection.duckdb"])
    third = _sync(config)
    assert _manifest(minio_client, s3_bucket, third)["metadata"]["carried_over"] == {}
    assert _restore(config, tmp_path / "third", upload_id=third["upload_id"]).notes == []


def test_restore_notes_name_what_an_upload_lacks_or_holds_from_an_earlier_one() -> None:
    from akosha_sync.repository.manifest import build_manifest
    from akosha_sync.repository.restore import content_notes

    manifest = build_manifest(
        system_id="h", upload_id="u2", uploaded_at=datetime(2026, 1, 2, tzinfo=UTC), files={},
        conversation_count=0, metadata={
            "missing_databases": ["knowledge_graph.duckdb"],
            "failed_databases": ["/d/reflection.duckdb is not a readable DuckDB database",
                                 "/d/other.duckdb kept changing while it was being copied"],
            "carried_over": {"reflection.duckdb": "u1", "reflection.duckdb.wal": "u1"},
        })
    assert content_notes(manifest, ["reflection.duckdb", "reflection.duckdb.wal"]) == [
        "reflection.duckdb is the version upload u1 stored: it could not be read when u2 "
        "was made",
        "a database could not be read when u2 was made and is not in it: /d/other.duckdb "
        "kept changing while it was being copied; an earlier upload may hold it "
        "(akosha-sync snapshots)",
        "knowledge_graph.duckdb is not in u2: it was not in the data folder when the upload "
        "was made; an earlier upload may hold it (akosha-sync snapshots)",
    ]


def test_restore_notes_name_a_database_the_sync_was_not_asked_for() -> None:
    from akosha_sync.repository.manifest import build_manifest
    from akosha_sync.repository.restore import content_notes

    def notes(carried: dict[str, str]) -> list[str]:
        manifest = build_manifest(
            system_id="h", upload_id="u2", uploaded_at=datetime(2026, 1, 2, tzinfo=UTC),
            files={}, conversation_count=0, metadata={
                "missing_databases": [], "failed_databases": [], "carried_over": carried,
                "not_selected": ["knowledge_graph.duckdb"],
            })
        return content_notes(manifest, ["reflection.duckdb", *carried])

    assert notes({"knowledge_graph.duckdb": "u1"}) == [
        "knowledge_graph.duckdb is the version upload u1 stored: the sync that made u2 "
        "was not asked for it",
    ]
    assert notes({}) == [  # the first upload: no earlier version to keep
        "knowledge_graph.duckdb is not in u2: the sync that made it was not asked for it "
        "and no earlier upload held it",
    ]


def test_temporary_files_of_a_killed_restore_are_removed_by_the_next(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now (reaped)
    left = target / f".reflection.duckdb.restore-{dead.pid}.tmp"
    left.write_bytes(b"half a database")
    running = subprocess.Popen(["sleep", "600"])  # stands for a restore still running
    try:
        live = target / f".reflection.duckdb.restore-{running.pid}.tmp"
        live.write_bytes(b"in use")
        _restore(config, target)
        assert not left.exists()
        assert live.read_bytes() == b"in use"
    finally:
        running.kill()
        running.wait()
    assert (target / "reflection.duckdb").read_bytes() == sample.reflection_path.read_bytes()


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_after_verify_finds_damage_the_next_upload_stores_those_bytes_again(
    layout: str, s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio,
    s3_bucket: str, tmp_path: Path,
) -> None:
    """A damaged object keeps its size, so the bucket listing cannot tell: before, every
    later sync reused it and said ok, and none of their uploads could be restored."""
    import io

    from akosha_sync.repository.service import verify_uploads

    config = s3_config(storage_layout=layout)
    first = _sync(config)
    if layout == "blocks":
        index = _index(minio_client, s3_bucket, first)
        piece = index["files"]["knowledge_graph.duckdb"]["pieces"][1]
        key, at = index["packs"][piece[1]]["key"], piece[2] + piece[3] // 2
    else:
        key = _manifest(minio_client, s3_bucket, first)["file_details"][
            "knowledge_graph.duckdb"]["key"]
        at = 100
    data = bytearray(get_object(minio_client, s3_bucket, key))
    data[at] ^= 0xFF  # same size: only reading the bytes shows it
    minio_client.put_object(s3_bucket, key, io.BytesIO(bytes(data)), len(data))

    found = anyio.run(lambda: verify_uploads(config, read_data="100%"))
    assert not found.ok and any(key in p and "forget" in p for p in found.uploads[0].problems)
    damaged = json.loads(get_object(minio_client, s3_bucket, "systems/test-host/damaged.json"))
    assert damaged == {"keys": [key]}

    add_conversations(sample.data_dir, 2, seed=31, checkpoint=True)  # only reflection changes
    second = _sync(config)
    assert key not in json.dumps(_manifest(minio_client, s3_bucket, second))
    if layout == "blocks":
        assert key not in json.dumps(_index(minio_client, s3_bucket, second))
    check = anyio.run(lambda: verify_uploads(config, upload_id=second["upload_id"],
                                             read_data="100%"))
    assert check.ok, check.uploads[0].problems
    target = tmp_path / "restored"
    _restore(config, target, upload_id=second["upload_id"])
    assert _snapshot_of(target) == _snapshot_of(sample.data_dir)


def test_after_an_older_upload_is_restored_into_data_dir_the_next_sync_stores_nothing_again(
    s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """A sync reuses the pieces of its last upload only: after `restore --force` of an
    older one, the pieces on disk are that upload's, and every one the last upload lacks
    was stored again."""
    config = s3_config(export_memories=False)
    assert config.data_path == sample.data_dir
    base = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)
    first = _sync(config, clock=lambda: base)
    before = _snapshot_of(sample.data_dir)
    add_conversations(sample.data_dir, 25, seed=41, checkpoint=True)
    second = _sync(config, clock=lambda: base + timedelta(hours=1))
    assert _manifest(minio_client, s3_bucket, second)["file_details"][
        "reflection.duckdb"]["new_pieces"] > 0

    _restore(config, sample.data_dir, upload_id=first["upload_id"], force=True)
    assert (config.state_path / "restored.json").is_file()
    third = _sync(config, clock=lambda: base + timedelta(hours=2))
    details = _manifest(minio_client, s3_bucket, third)["file_details"]
    assert {name: d.get("new_pieces") for name, d in details.items()} == {
        name: 0 for name in details}
    assert not [k for k in third["files_uploaded"] if "/packs/" in k]
    packs = set(_index(minio_client, s3_bucket, third)["packs"])
    assert packs <= set(_index(minio_client, s3_bucket, first)["packs"])
    assert not (config.state_path / "restored.json").exists()  # the note served once
    target = tmp_path / "again"
    _restore(config, target, upload_id=third["upload_id"])
    assert _snapshot_of(target) == before


def test_the_restore_note_names_the_store_without_its_credentials(tmp_path: Path) -> None:
    """The note is written to disk: a password in the endpoint URL stays out of it, and
    the same store spelled another way (or with a rotated password) still matches."""
    from akosha_sync.repository.restored import note_restored, restored_manifest_key

    def config(endpoint: str) -> AkoshaSyncConfig:
        return AkoshaSyncConfig(cloud_endpoint=endpoint, cloud_bucket="bucket",
                                system_id="test-host", data_dir=str(tmp_path / "data"),
                                state_dir=str(tmp_path / "state"))

    first = config("http://user:s3cret-pw@127.0.0.1:9000")
    (tmp_path / "data").mkdir()
    assert note_restored(first, system_id="test-host", upload_id="u1", manifest_key="k1",
                         target=tmp_path / "data")
    assert b"s3cret-pw" not in (tmp_path / "state" / "restored.json").read_bytes()
    assert restored_manifest_key(config("HTTP://user:rotated@127.0.0.1:9000/")) == "k1"
    assert restored_manifest_key(config("http://127.0.0.1:9001")) is None
