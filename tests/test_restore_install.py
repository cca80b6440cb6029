"""Putting restored files in place (repository/placement.py), against a real SeaweedFS
and real DuckDB files: what changed in the target during the download, a signal or a
crash between two renames, file names from the bucket, backups that stay in pairs.

Changes during the download are made from the restore's own progress callback (its
public seam); signals and crashes are sent by the restore process to itself right
after a chosen rename, the one moment a test cannot otherwise reach."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.restore import RestoreError
from akosha_sync.sample import SampleInfo, add_conversations
from support.process import hold_open_in_duckdb, let_go
from support.verify import get_object
from test_restore import _restore, _snapshot_of, _sync, _toml

MakeConfig = Callable[..., AkoshaSyncConfig]
_EXE = str(Path(sys.executable).with_name("akosha-sync"))


def _opens(path: Path) -> bool:
    try:
        duckdb.connect(str(path), read_only=True).close()
    except duckdb.Error:
        return False
    return True


def _on_download(action: Callable[[], None]) -> Callable[[str, int, int], None]:
    """A progress callback that runs ``action`` once, when the download starts."""
    done: list[bool] = []

    def progress(phase: str, current: int, total: int) -> None:
        if phase == "restore:download" and not done:
            done.append(True)
            action()

    return progress


def test_a_database_opened_during_the_download_is_not_replaced_even_with_force(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    """The plan found it closed; Session-Buddy opened it while the packs came in."""
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    live = target / "reflection.duckdb"
    duckdb.connect(str(live)).close()
    holders: list[subprocess.Popen[str]] = []
    try:
        with pytest.raises(RestoreError, match="opened by a running process") as info:
            _restore(config, target, force=True,
                     progress=_on_download(lambda: holders.append(hold_open_in_duckdb(live))))
        assert str(live) in str(info.value)
        # Only the holder's own files (its database, and the WAL its writes made).
        assert {p.name for p in target.iterdir()} <= {"reflection.duckdb",
                                                     "reflection.duckdb.wal"}
    finally:
        for proc in holders:
            let_go(proc)
    con = duckdb.connect(str(live), read_only=True)  # the holder's writes are in place
    assert con.execute("SELECT x FROM mine").fetchall() == [(42,)]
    con.close()


def test_a_file_that_appears_during_the_download_is_never_overwritten(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    mine = target / "knowledge_graph.duckdb"
    with pytest.raises(RestoreError, match="appeared while the restore was downloading"):
        _restore(config, target, progress=_on_download(lambda: mine.write_bytes(b"mine")))
    assert _snapshot_of(target) == {"knowledge_graph.duckdb": b"mine"}


@pytest.mark.parametrize("layout", ["blocks", "files"])
def test_a_file_name_that_is_a_path_in_the_bucket_is_refused(
    layout: str, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    """Names come from the bucket (damage, or another machine writing there); the
    SHA-256 checks cover contents, not names. Nothing is written, inside or outside."""
    config = s3_config(export_memories=False, storage_layout=layout)
    result = _sync(config)
    manifest = json.loads(get_object(minio_client, s3_bucket, result["manifest_key"]))
    key = manifest["index"] if layout == "blocks" else result["manifest_key"]
    doc = json.loads(get_object(minio_client, s3_bucket, key))
    files = doc["files"] if layout == "blocks" else doc["file_details"]
    files["../escaped.duckdb"] = files.pop("knowledge_graph.duckdb")
    if layout == "files":
        doc["files"] = list(doc["file_details"])
    body = json.dumps(doc).encode()
    minio_client.put_object(s3_bucket, key, io.BytesIO(body), len(body))
    target = tmp_path / "deep" / "target"
    with pytest.raises(RestoreError, match=r"'\.\./escaped\.duckdb', which is not a plain"):
        _restore(config, target)
    assert not (tmp_path / "deep" / "escaped.duckdb").exists()
    assert not target.exists() or list(target.iterdir()) == []


def _restore_killed_after_renaming(
    config: AkoshaSyncConfig, toml: Path, target: Path, name: str, sig: signal.Signals,
) -> subprocess.CompletedProcess[str]:
    """``akosha-sync restore --force`` that sends itself ``sig`` right after the
    restored ``name`` is renamed into place."""
    child = (
        "import os, signal, sys\n"
        "from akosha_sync.cli import run\n"
        "real = os.replace\n"
        "def replace(src, dst, *args, **kwargs):\n"
        "    real(src, dst, *args, **kwargs)\n"
        f"    if '.restore-' in str(src) and str(dst).endswith({name!r}):\n"
        f"        os.kill(os.getpid(), {int(sig)})\n"
        "os.replace = replace\n"
        f"sys.argv = ['akosha-sync', '--config', {str(toml)!r}, 'restore', '--to', "
        f"{str(target)!r}, '--force', '-q']\n"
        "run()\n"
    )
    return subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restore_stopped_between_two_renames_leaves_databases_that_open(
    sig: signal.Signals, s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path,
) -> None:
    """Stopped right after the new reflection.duckdb is in place, before its WAL.
    Before, the old WAL was still beside it (DuckDB: "WAL checkpoint iteration does not
    match the database file"), and SIGTERM also skipped the roll back. Now SIGTERM waits
    for the last rename, and even a SIGKILL (a power cut) leaves no old WAL beside a
    new database: the old WAL is set aside before any database is renamed."""
    config = s3_config(export_memories=False)
    _sync(config)
    wal = Path(f"{sample.reflection_path}.wal")
    assert wal.exists()
    uploaded = {p.name: p.read_bytes() for p in
                (sample.reflection_path, wal, sample.knowledge_graph_path)}
    # The local databases move on: another state, with a WAL of its own.
    add_conversations(sample.data_dir, 20, seed=7, checkpoint=True)
    add_conversations(sample.data_dir, 5, seed=8)
    assert wal.exists()
    local = _snapshot_of(sample.data_dir)
    toml = _toml(config, tmp_path / "c.toml")
    done = _restore_killed_after_renaming(config, toml, sample.data_dir, "reflection.duckdb", sig)
    if sig == signal.SIGTERM:
        assert done.returncode == 143, done.stderr
        assert "interrupted" in done.stderr
        restored = _snapshot_of(sample.data_dir)
        assert {n: restored[n] for n in uploaded} == uploaded  # the whole restore is in
    else:
        assert done.returncode == -signal.SIGKILL
    for db in ("reflection.duckdb", "knowledge_graph.duckdb"):
        assert _opens(sample.data_dir / db), db
    # Nothing of the local state is lost: every replaced file is kept as a backup.
    backups = {p.name.split(".bak-")[0]: p.read_bytes()
               for p in sample.data_dir.iterdir() if ".bak-" in p.name}
    assert backups["reflection.duckdb"] == local["reflection.duckdb"]
    assert backups["reflection.duckdb.wal"] == local["reflection.duckdb.wal"]


def test_backups_of_one_restore_share_one_suffix(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    """Two restores in the same second: the second one's database and WAL backups
    are ``.bak-<time>.1`` both, so a database is never paired with another's WAL."""
    from datetime import UTC, datetime

    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    (target / "reflection.duckdb").write_bytes(b"db 0")
    (target / "reflection.duckdb.wal").write_bytes(b"wal 0")
    (target / "reflection.duckdb.bak-20261130T080000Z").write_bytes(b"someone's backup")
    now = datetime(2026, 11, 30, 8, 0, 0, tzinfo=UTC)
    result = _restore(config, target, force=True, now=now)
    kept = {f.name: f.backup for f in result.files if f.backup}
    assert kept == {
        "reflection.duckdb": str(target / "reflection.duckdb.bak-20261130T080000Z.1"),
        "reflection.duckdb.wal": str(target / "reflection.duckdb.wal.bak-20261130T080000Z.1"),
    }
    assert Path(kept["reflection.duckdb.wal"]).read_bytes() == b"wal 0"
    assert (target / "reflection.duckdb.bak-20261130T080000Z").read_bytes() == b"someone's backup"


def test_a_dangling_symlink_in_the_target_is_not_replaced_silently(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    config = s3_config(export_memories=False)
    _sync(config)
    target = tmp_path / "target"
    target.mkdir()
    link = target / "reflection.duckdb"
    link.symlink_to(tmp_path / "elsewhere" / "reflection.duckdb")  # a disk not mounted
    with pytest.raises(RestoreError, match="--force"):
        _restore(config, target)
    assert link.is_symlink()
    result = _restore(config, target, force=True)
    backup = next(f.backup for f in result.files if f.name == "reflection.duckdb")
    assert backup is not None and Path(backup).is_symlink()
    assert os.readlink(backup) == str(tmp_path / "elsewhere" / "reflection.duckdb")
    assert not link.is_symlink() and _opens(link)
