"""The daemon's worker and its queue across processes: configured methods, owned
requests, bounded waits, and errors that end a sync but never the daemon.

Daemons run as real processes (``serve``, ``drain``) on one state folder; tools are
called with the MCP SDK's real clients; uploads go to the real SeaweedFS and the
HTTP fallback to the real Akosha. Ordering comes from the state lock the test holds
and from polling the queue, never from sleeps.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client, StdioServerParameters
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server import daemon as daemon_module
from akosha_sync.server.app import build_mcp_server
from akosha_sync.server.daemon import SyncDaemon
from akosha_sync.server.queue import JobQueue, RequestState
from support.akosha import AkoshaServer
from support.configfile import write_toml
from support.verify import manifests
from support.wait import until
from test_server import (
    EXE,
    Daemon,
    _holding_sync_lock,
    _session_end,
    daemon_factory,
)

__all__ = ["daemon_factory"]  # the fixture, shared with test_server

MakeConfig = Callable[..., AkoshaSyncConfig]
DaemonFactory = Callable[[AkoshaSyncConfig], Daemon]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _call(url: str, arguments: dict[str, Any]) -> dict[str, Any]:
    async def call() -> dict[str, Any]:
        with anyio.fail_after(60):
            async with Client(f"{url}/mcp") as client:
                result = await client.call_tool("sync_to_akosha", arguments)
        assert not result.is_error and result.structured_content is not None
        return result.structured_content

    return anyio.run(call)


def _state(config: AkoshaSyncConfig, request_id: int) -> RequestState:
    return JobQueue(config.state_path).state_of(request_id)


# ------------------------------------------------- the configuration is the default
def test_configured_force_method_is_the_default_and_an_argument_overrides_it(
    s3_config: MakeConfig, daemon_factory: DaemonFactory, akosha: AkoshaServer,
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config(force_method="http", akosha_url=akosha.url, system_id="i9d-forced")
    daemon = daemon_factory(config)
    plain = _call(daemon.url, {})
    assert plain["method"] == "http" and plain["success"], plain["error"]
    assert manifests(minio_client, s3_bucket) == []  # the cloud was not used
    hook = httpx.post(f"{daemon.url}/hooks/session-end", json=_session_end(), timeout=5)
    assert hook.status_code == 202
    served = until(lambda: _state(config, hook.json()["request_id"]).result,
                    what="the hook's sync")
    assert served["method"] == "http" and served["success"], served["error"]
    explicit = _call(daemon.url, {"method": "cloud"})
    assert explicit["method"] == "cloud" and explicit["success"], explicit["error"]
    assert len(manifests(minio_client, s3_bucket)) == 1


@pytest.mark.anyio
async def test_configured_no_fallback_is_the_default(
    make_config: MakeConfig, akosha: AkoshaServer
) -> None:
    config = make_config(cloud_bucket="nowhere", cloud_endpoint="http://127.0.0.1:9",
                         access_key_id="AKIATEST", secret_access_key="secret-test-value",
                         akosha_url=akosha.url, enable_fallback=False, max_retries=0,
                         system_id="i9d-no-fallback")
    daemon = SyncDaemon(config)
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        with anyio.fail_after(60):
            plain = (await client.call_tool("sync_to_akosha", {})).structured_content
            assert plain is not None
            assert plain["success"] is False
            assert [a["method"] for a in plain["method_attempts"]] == ["cloud"]
            allowed = (await client.call_tool("sync_to_akosha", {"enable_fallback": True})
                       ).structured_content
        assert allowed is not None
        assert allowed["success"] and allowed["method"] == "http", allowed["error"]


# ------------------------------------------------------ one queue, several processes
def test_a_tool_call_gets_the_result_when_another_process_ran_its_request(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    """A stdio server's second call is claimed and run by a `drain` process."""
    config = s3_config()
    toml = write_toml(config, tmp_path / "stdio.toml")
    queue = JobQueue(config.state_path)
    params = StdioServerParameters(
        command=EXE, args=["--config", str(toml), "serve", "--transport", "stdio"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
    )
    results: dict[int, dict[str, Any]] = {}

    async def call(client: Client, n: int) -> None:
        result = await client.call_tool("sync_to_akosha", {})
        assert result.structured_content is not None
        results[n] = result.structured_content

    async def eventually(check: Callable[[], Any], what: str) -> Any:
        return await anyio.to_thread.run_sync(lambda: until(check, timeout=30, what=what))

    async def scenario() -> tuple[str, str, int]:
        with anyio.fail_after(90):
            async with Client(params) as client, anyio.create_task_group() as tg:
                with _holding_sync_lock(config):
                    tg.start_soon(call, client, 1)
                    first = await eventually(
                        lambda: (s := queue.state_of(1)).status == "running" and s,
                        "the server to claim request 1")
                    tg.start_soon(call, client, 2)  # its worker is busy: 2 stays pending
                    await eventually(lambda: queue.state_of(2).status == "pending", "request 2")
                    drain = await anyio.open_process(
                        [EXE, "--config", str(toml), "drain"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    second = await eventually(
                        lambda: (s := queue.state_of(2)).status == "running" and s,
                        "drain to claim request 2")
                    assert queue.state_of(1).owner == first.owner  # not taken from the server
                assert await drain.wait() == 0
            return str(first.owner), str(second.owner), drain.pid

    server_owner, drain_owner, drain_pid = anyio.run(scenario)
    assert server_owner != drain_owner and drain_owner.startswith(f"{drain_pid}:")
    assert results[1]["success"] and results[2]["success"], results
    assert results[2] == _state(config, 2).result  # the drain's result, handed over
    assert results[1]["upload_id"] != results[2]["upload_id"]


def test_a_second_daemon_leaves_a_live_daemons_request_and_recovers_a_dead_ones(
    s3_config: MakeConfig, daemon_factory: DaemonFactory, tmp_path: Path,
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config()
    first = daemon_factory(config)
    with _holding_sync_lock(config):
        hook = httpx.post(f"{first.url}/hooks/session-end", json=_session_end(), timeout=5)
        request_id = hook.json()["request_id"]
        owner = until(lambda: (s := _state(config, request_id)).status == "running"
                       and s.owner, what="the first daemon to claim it")
        assert first.proc is not None and owner.startswith(f"{first.proc.pid}:")
        second = daemon_factory(config)  # recovers at start, before it listens
        assert _state(config, request_id).owner == owner
        assert second.status()["queued"] == 0
        first.kill()  # acknowledged, claimed, never finished
    assert manifests(minio_client, s3_bucket) == []
    # A drain beside the live second daemon recovers the dead one's request and runs it.
    done = subprocess.run([EXE, "--config", str(second.toml), "drain"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    state = until(lambda: (s := _state(config, request_id)).status == "done" and s,
                   what="the recovered request to finish")
    assert state.result is not None and state.result["success"]
    assert len(manifests(minio_client, s3_bucket)) == 1
    assert second.stop() == 0


_CLAIM_AND_DIE = """
import sqlite3, sys, time
from akosha_sync.server.queue import JobQueue, process_owner
queue = JobQueue(__import__("pathlib").Path(sys.argv[1]))
con = sqlite3.connect(queue.path)
with con:  # queued and claimed in one step: no other worker ever sees it pending
    cur = con.execute(
        "INSERT INTO requests (trigger, method, received_at, status, claimed_by)"
        " VALUES ('manual', 'unset', ?, 'running', ?)", (time.time(), process_owner()))
print(cur.lastrowid)
"""


@pytest.mark.anyio
async def test_a_waiting_call_recovers_a_request_whose_owner_died(s3_config: MakeConfig) -> None:
    """The owner died after claiming; the daemon's idle worker is woken by the waiter."""
    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running():
        with anyio.fail_after(20):  # the idle worker's own sweep comes only after 30 s
            claimed = await anyio.run_process(
                [sys.executable, "-c", _CLAIM_AND_DIE, str(config.state_path)])
            request_id = int(claimed.stdout)
            state = daemon.queue.state_of(request_id)
            assert state.status == "running" and state.owner is not None
            result = await daemon.wait_for(request_id)
        assert result["success"], result["error"]
        assert daemon.queue.state_of(request_id).owner != state.owner


@pytest.mark.anyio
async def test_every_wait_is_bounded(s3_config: MakeConfig) -> None:
    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running():
        with _holding_sync_lock(config), anyio.fail_after(30):
            request_id = await daemon.submit("manual")
            answer = await daemon.wait_for(request_id, timeout=1)
        assert answer["success"] is False and answer["queued"] is True
        assert f"request {request_id} is still running" in answer["error"]
        # It stays queued and runs once the lock is free.
        with anyio.fail_after(60):
            done = await daemon.wait_for(request_id)
        assert done["success"], done["error"]


# ---------------------------------------------- an unexpected error is just a result
def test_an_os_error_in_the_state_folder_fails_one_sync_not_the_daemon(
    s3_config: MakeConfig, daemon_factory: DaemonFactory
) -> None:
    config = s3_config()
    daemon = daemon_factory(config)
    lock = config.state_path / "sync.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # the fault: opening the lock file raises IsADirectoryError
    failed = _call(daemon.url, {})
    assert failed["success"] is False
    assert "IsADirectoryError" in failed["error"] and "sync.lock" in failed["error"]
    assert daemon.status()["status"] == "ok"
    lock.rmdir()
    again = _call(daemon.url, {})
    assert again["success"], again["error"]
    history = JobQueue(config.state_path).history(5)
    assert [h["success"] for h in history[:2]] == [True, False]
    assert "IsADirectoryError" in str(history[1]["error"])
    assert daemon.stop() == 0


@pytest.mark.anyio
async def test_a_sqlite_or_duckdb_error_is_answered_and_recorded(
    s3_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb

    real = daemon_module.run_sync
    faults: list[Exception] = [sqlite3.OperationalError("database is locked"),
                               duckdb.IOException("Could not set lock on file")]

    async def faulty(*args: Any, **kwargs: Any) -> dict[str, Any]:
        if faults:
            raise faults.pop(0)
        return await real(*args, **kwargs)

    monkeypatch.setattr(daemon_module, "run_sync", faulty)
    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        with anyio.fail_after(60):
            answers = [(await client.call_tool("sync_to_akosha", {})).structured_content
                       for _ in range(3)]
    assert [a is not None and a["success"] for a in answers] == [False, False, True]
    assert answers[0] is not None and "database is locked" in answers[0]["error"]
    assert answers[1] is not None and "Could not set lock" in answers[1]["error"]
    recorded = [json.dumps(h) for h in daemon.queue.history(3)]
    assert "database is locked" in recorded[2] and "Could not set lock" in recorded[1]


@pytest.mark.anyio
async def test_a_request_at_idle_syncs_even_when_nothing_changed(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str
) -> None:
    """Only a request that arrived while a sync ran shares its result; one made later
    runs, and finds the bucket as it is now (here: its upload deleted by hand)."""
    from support.faults import objects, restore_problems

    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running():
        with anyio.fail_after(60):
            first = await daemon.wait_for(await daemon.submit("manual"))
        assert first["success"], first["error"]
        for key in objects(minio_client, s3_bucket):
            minio_client.remove_object(s3_bucket, key)
        with anyio.fail_after(60):
            again = await daemon.wait_for(await daemon.submit("manual"))
    assert again["success"], again["error"]
    # A real sync: it found its pieces gone and sent them again (within the same second
    # it may take the same upload id: its claim was deleted with the rest).
    assert "skipped" not in again and again["bytes_transferred"] > 0
    assert manifests(minio_client, s3_bucket) == [again["manifest_key"]]
    assert restore_problems(minio_client, s3_bucket) == []


@pytest.mark.anyio
async def test_a_request_made_while_a_sync_runs_shares_its_result_if_nothing_changed(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str
) -> None:
    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running():
        with _holding_sync_lock(config), anyio.fail_after(60):
            first_id = await daemon.submit("manual")
            # The worker has claimed it and waits for the lock: the sync has started.
            await anyio.to_thread.run_sync(
                lambda: until(lambda: daemon.current is not None, what="the first sync"))
            second_id = await daemon.submit("session-end")
        with anyio.fail_after(60):
            first = await daemon.wait_for(first_id)
            second = await daemon.wait_for(second_id)
    assert first["success"], first["error"]
    assert second["skipped"] == "databases unchanged since the sync it waited for"
    assert second["upload_id"] == first["upload_id"]
    assert manifests(minio_client, s3_bucket) == [first["manifest_key"]]


@pytest.mark.anyio
async def test_a_request_the_queue_could_not_record_or_take_back_runs_again(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str,
) -> None:
    """The sync ended while the queue could not be written (another process held
    SQLite's lock past its timeout, a full disk: injected at the queue's two calls).
    Before, the request stayed 'running' under this live daemon for ever, never run
    again; now it is given back before the next claim and runs."""
    config = s3_config(export_memories=False)
    daemon = SyncDaemon(config)
    queue = daemon.queue
    real_finish, real_release = queue.finish, queue.release
    faults = {"finish": 1, "release": 1}

    def finish(*args: Any, **kwargs: Any) -> None:
        if faults["finish"]:
            faults["finish"] -= 1
            raise sqlite3.OperationalError("database is locked")
        real_finish(*args, **kwargs)

    def release(ids: list[int]) -> None:
        if faults["release"]:
            faults["release"] -= 1
            raise sqlite3.OperationalError("database is locked")
        real_release(ids)

    queue.finish = finish  # type: ignore[method-assign]
    queue.release = release  # type: ignore[method-assign]
    async with daemon.running():
        request = await daemon.submit("manual")
        await daemon.wait_for(request)
        assert faults == {"finish": 0, "release": 0}, "the faults did not happen"
        await anyio.to_thread.run_sync(lambda: until(
            lambda: queue.state_of(request).status == "done", timeout=60,
            what="the request to run again and be recorded"))
    assert manifests(minio_client, s3_bucket)

