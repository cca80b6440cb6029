"""Damaged state and unexpected errors (issue 9, fault scenario 8 and the runner's catch).

A damaged file in ``state_dir`` is moved aside as ``NAME.corrupt-<UTC time>`` (never
deleted), a warning names it, and work goes on; a lock held by another process is not
damage. An unexpected error in a sync is a failed result, not a traceback. Real
processes (``akosha-sync sync`` / ``drain``), real SeaweedFS, real DuckDB and SQLite.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.queue import JobQueue
from akosha_sync.sync import records
from support.faults import EXE, write_toml

MakeConfig = Callable[..., AkoshaSyncConfig]


def _aside(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.corrupt-*"))


def _warnings(config: AkoshaSyncConfig) -> list[str]:
    return [line for line in config.log_path.read_text().splitlines() if '"warning"' in line]


def _cli(config: AkoshaSyncConfig, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    toml = write_toml(config, tmp_path / "c.toml")
    return subprocess.run([EXE, "--config", str(toml), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_sync_recovers_damaged_state_files(s3_config: MakeConfig, tmp_path: Path) -> None:
    config = s3_config()
    assert json.loads(_cli(config, tmp_path, "sync", "--json", "--method", "cloud").stdout)[
        "success"]
    state = config.state_path
    (target,) = (state / "targets").glob("*.json")
    delivered = state / "delivered.duckdb"
    broken = {target: target.read_bytes()[:10], delivered: delivered.read_bytes()[:1000]}
    for path, data in broken.items():
        path.write_bytes(data)

    done = _cli(config, tmp_path, "sync", "--json", "--method", "cloud")
    assert json.loads(done.stdout)["success"], done.stderr
    for path, data in broken.items():
        (moved,) = _aside(path)
        assert moved.read_bytes() == data, "the damaged file must be kept as it was"
        assert any(path.name in w and moved.name in w for w in _warnings(config)), path
    assert json.loads(target.read_bytes())["last_upload_id"]  # written anew
    with duckdb.connect(str(delivered), read_only=True) as con:  # recreated, progress kept
        assert con.execute("SELECT count(*) FROM delivered").fetchone() != (0,)


def test_drain_recovers_a_queue_that_is_not_sqlite(s3_config: MakeConfig,
                                                   tmp_path: Path) -> None:
    config = s3_config()
    config.state_path.mkdir(parents=True)
    queue = config.state_path / "queue.sqlite3"
    queue.write_bytes(b"not a database\n" * 100)
    done = _cli(config, tmp_path, "drain")
    assert done.returncode == 0, done.stderr
    (moved,) = _aside(queue)
    assert moved.read_bytes() == b"not a database\n" * 100
    assert any("queue.sqlite3" in w for w in _warnings(config))
    assert JobQueue(config.state_path).enqueue("test") == 1  # a working, new queue


def test_truncated_queue_is_set_aside_once_by_concurrent_openers(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    for i in range(500):
        queue.enqueue("test", payload={"pad": "x" * 200, "i": i})
    path = tmp_path / "queue.sqlite3"
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # Three processes find it damaged at once (the daemon, the hook command, drain).
    code = ("import sys; from pathlib import Path; from akosha_sync.server.queue import "
            "JobQueue; JobQueue(Path(sys.argv[1])).enqueue('x')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)],
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    assert len(_aside(path)) == 1, "a second opener moved the new queue aside"
    assert JobQueue(tmp_path).claim_pending().__len__() == 3  # none of the three was lost


def test_a_locked_progress_store_is_not_taken_for_damage(tmp_path: Path) -> None:
    path = tmp_path / "delivered.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        con = duckdb.connect()
        with pytest.raises(duckdb.Error, match="lock"):
            records.open_progress(con, path)
        con.close()
    finally:
        holder.kill()
        holder.wait(10)
    assert _aside(path) == [] and path.exists()


def test_unexpected_error_is_a_failed_result_not_a_traceback(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    """A DuckDB lock error in the middle of a sync (another process holds the store)."""
    config = s3_config()
    path = config.state_path / "delivered.duckdb"
    config.state_path.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = _cli(config, tmp_path, "sync", "--json", "--method", "cloud")
    finally:
        holder.kill()
        holder.wait(10)
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == 1 and result["success"] is False
    assert "unexpected IOException" in result["error"] and "lock" in result["error"]
    assert str(config.log_path) in result["error"]
    assert "Traceback" in config.log_path.read_text()  # the details are in the log
