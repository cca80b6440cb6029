"""The daemon: MCP tools in memory, real stdio/HTTP/SSE transports, the hook route,
the durable queue, and the hook command. Uploads go to the real SeaweedFS."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.app import build_mcp_server
from akosha_sync.server.daemon import SyncDaemon
from support.configfile import write_toml
from support.verify import manifests
from support.wait import until

MakeConfig = Callable[..., AkoshaSyncConfig]
ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("akosha-sync"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"




@contextmanager
def _holding_sync_lock(config: AkoshaSyncConfig) -> Iterator[None]:
    """The seam: while the test holds the state lock, the daemon's sync cannot proceed."""
    config.state_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.state_path / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Daemon:
    """A real `akosha-sync serve` process on a free port."""

    def __init__(self, config: AkoshaSyncConfig, toml: Path) -> None:
        self.config = config
        self.toml = toml
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> Daemon:
        info = self.config.state_path / "daemon.json"
        info.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [EXE, "--config", str(self.toml), "serve", "--transport", "http", "--port", "0",
             "--grace", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.config.state_path.parent / "daemon.err", "ab"),  # noqa: SIM115
        )
        proc = self.proc

        def ready() -> str | None:
            assert proc.poll() is None, "daemon exited"
            try:
                data = json.loads(info.read_text())
            except (OSError, ValueError):
                return None
            return str(data["url"]) if data.get("pid") == proc.pid else None

        self.url = until(ready, what="daemon start")
        return self

    def status(self) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=5).json())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[[AkoshaSyncConfig], Daemon]]:
    started: list[Daemon] = []

    def make(config: AkoshaSyncConfig) -> Daemon:
        d = Daemon(config, write_toml(config, tmp_path / f"daemon-{len(started)}.toml")).start()
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def _session_end(session: str = "s-1") -> dict[str, str]:
    return {"session_id": session, "transcript_path": "/tmp/t.jsonl", "cwd": "/tmp",
            "hook_event_name": "SessionEnd", "reason": "prompt_input_exit"}


# ------------------------------------------------------------------ in memory
@pytest.mark.anyio
async def test_tools_in_memory(s3_config: MakeConfig, minio_client: Minio, s3_bucket: str
                               ) -> None:
    config = s3_config()
    daemon = SyncDaemon(config)
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) >= {"sync_to_akosha", "akosha_sync_status"}
        schema = tools["sync_to_akosha"].input_schema
        assert schema["properties"]["method"]["enum"] == ["auto", "cloud", "http"]
        # Every argument says what it is (the model reads the schema, not our README).
        undescribed = [f"{t.name}.{name}" for t in tools.values()
                       for name, prop in t.input_schema.get("properties", {}).items()
                       if len(prop.get("description", "")) < 10]
        assert not undescribed

        progress: list[tuple[float, float | None, str | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, total, message))

        result = await client.call_tool("sync_to_akosha", {}, progress_callback=on_progress)
        data = result.structured_content
        assert not result.is_error and data is not None
        assert data["success"] is True and data["triggered_by"] == "manual"
        assert data["method"] == "cloud"
        assert {"files_uploaded", "bytes_transferred", "duration_seconds", "upload_id",
                "error"} <= set(data)
        assert progress and any(m and m.startswith("upload:") for _, _, m in progress)
        assert len(manifests(minio_client, s3_bucket)) == 1

        bad = await client.call_tool("sync_to_akosha", {"method": "ftp"})
        assert bad.is_error
        text = bad.content[0].text  # type: ignore[union-attr]
        assert "method" in text and "'auto', 'cloud' or 'http'" in text

        status = (await client.call_tool("akosha_sync_status", {})).structured_content
        assert status is not None
        for key in ("cloud_configured", "system_id", "should_use_cloud", "should_use_http",
                    "force_method", "enable_fallback", "upload_on_session_end",
                    "configuration", "validation_errors", "running", "queued", "last_result",
                    "history"):
            assert key in status, key
        assert status["configuration"]["secret_access_key"] == "***redacted***"
        assert status["history"][0]["triggered_by"] == "manual"
        assert status["last_result"]["upload_id"] == data["upload_id"]
        assert config.secret_access_key not in json.dumps(status)


@pytest.mark.anyio
async def test_failed_sync_is_a_result_not_a_crash(make_config: MakeConfig) -> None:
    config = make_config(cloud_bucket="nowhere", cloud_endpoint="http://127.0.0.1:9",
                         access_key_id="AKIATEST", secret_access_key="secret-test-value",
                         akosha_url="http://127.0.0.1:9/mcp", max_retries=0)
    daemon = SyncDaemon(config)
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        result = await client.call_tool("sync_to_akosha", {"method": "cloud"})
        data = result.structured_content
        assert not result.is_error and data is not None
        assert data["success"] is False and "could not connect" in data["error"]


# ------------------------------------------------------------ real transports
def test_stdio_subprocess(s3_config: MakeConfig, tmp_path: Path) -> None:
    import anyio

    config = s3_config()
    toml = write_toml(config, tmp_path / "stdio.toml")

    async def talk() -> dict[str, Any]:
        params = StdioServerParameters(
            command=EXE, args=["--config", str(toml), "serve", "--transport", "stdio"],
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")},
        )
        async with Client(params) as client:
            result = await client.call_tool("sync_to_akosha", {"method": "cloud"})
            assert result.structured_content is not None
            return result.structured_content

    data = anyio.run(talk)
    assert data["success"] is True and data["triggered_by"] == "manual"


def test_http_and_sse_transports_health_and_hook(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    import anyio

    config = s3_config()
    daemon = daemon_factory(config)
    assert daemon.status()["status"] == "ok"

    async def talk() -> tuple[dict[str, Any], dict[str, Any]]:
        async with Client(f"{daemon.url}/mcp") as client:
            first = (await client.call_tool("akosha_sync_status", {})).structured_content
        async with Client(sse_client(f"{daemon.url}/sse")) as client:
            second = (await client.call_tool("sync_to_akosha", {})).structured_content
        assert first is not None and second is not None
        return first, second

    status, result = anyio.run(talk)
    assert status["daemon"]["transport"] == "http"
    assert result["success"] is True
    # A second daemon on the same port: one sentence, and the first one keeps serving.
    port = daemon.url.rsplit(":", 1)[1]
    second = subprocess.run([EXE, "--config", str(daemon.toml), "serve", "--transport",
                             "http", "--port", port], capture_output=True, text=True,
                            timeout=60, check=False)
    assert second.returncode == 2, second.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.stderr
    assert "Traceback" not in second.stderr and "ExceptionGroup" not in second.stderr
    assert daemon.status()["status"] == "ok"
    # status names the daemon that runs (the refused one did not take its place).
    shown = subprocess.run([EXE, "--config", str(daemon.toml), "status", "--json"],
                           capture_output=True, text=True, timeout=60, check=True)
    assert daemon.proc is not None
    assert json.loads(shown.stdout)["daemon"] == {"pid": daemon.proc.pid, "url": daemon.url}
    assert daemon.stop() == 0


# ------------------------------------------------------------------ hook route
def test_hook_route_answers_fast_and_collapses_triggers(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config()
    daemon = daemon_factory(config)
    with httpx.Client(base_url=daemon.url, timeout=5) as http, _holding_sync_lock(config):
        first = http.post("/hooks/session-end", json=_session_end("first"))
        assert first.status_code == 202 and first.json()["accepted"] is True
        until(lambda: daemon.status()["running"], what="the first sync to start")
        for i in range(20):
            started = time.monotonic()
            answer = http.post("/hooks/session-end", json=_session_end(f"s-{i}"))
            assert answer.status_code == 202
            assert time.monotonic() - started < 1.0  # a sync is running, we still answer
        assert daemon.status()["queued"] == 20
    until(lambda: not daemon.status()["running"] and daemon.status()["queued"] == 0,
           what="the queue to drain")
    history = _status_via_mcp(daemon.url)["history"]
    served = sum(h["requests_served"] for h in history)
    assert served == 21
    real_syncs = [h for h in history if h["upload_id"]]
    assert 1 <= len(manifests(minio_client, s3_bucket)) <= 2, "more than one follow-up"
    assert len(history) <= 2 and real_syncs


def _refused(url: str) -> bool:
    try:
        httpx.get(f"{url}/health", timeout=1)
    except httpx.TransportError:
        return True
    return False


def _status_via_mcp(url: str) -> dict[str, Any]:
    import anyio

    async def ask() -> dict[str, Any]:
        async with Client(f"{url}/mcp") as client:
            data = (await client.call_tool("akosha_sync_status", {})).structured_content
            assert data is not None
            return data

    return anyio.run(ask)


def test_bad_hook_bodies_and_token(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    config = s3_config(daemon_token="hook-token-123456")
    daemon = daemon_factory(config)
    auth = {"Authorization": "Bearer hook-token-123456"}
    with httpx.Client(base_url=daemon.url, timeout=5) as http:
        assert http.post("/hooks/session-end", json=_session_end()).status_code == 401
        wrong = http.post("/hooks/session-end", json=_session_end(),
                          headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        not_json = http.post("/hooks/session-end", content=b"{oops",
                             headers={**auth, "Content-Type": "application/json"})
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]
        stop = http.post("/hooks/session-end", headers=auth,
                         json={**_session_end(), "hook_event_name": "Stop"})
        assert stop.status_code == 400 and "SessionEnd" in stop.json()["error"]
        no_id = http.post("/hooks/session-end", headers=auth,
                          json={"hook_event_name": "SessionEnd"})
        assert no_id.status_code == 400 and "session_id" in no_id.json()["error"]
        deep = http.post("/hooks/session-end", content=b"[" * 30_000 + b"]" * 30_000,
                         headers={**auth, "Content-Type": "application/json"})
        assert deep.status_code == 400 and "nested" in deep.json()["error"]
        assert http.post("/hooks/session-end", json=_session_end(), headers=auth
                         ).status_code == 202
    log = config.log_path.read_text()
    assert "hook-token-123456" not in log and config.secret_access_key not in log


def test_hook_ignored_when_upload_on_session_end_is_off(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    daemon = daemon_factory(s3_config(upload_on_session_end=False))
    answer = httpx.post(f"{daemon.url}/hooks/session-end", json=_session_end(), timeout=5)
    assert answer.status_code == 200 and answer.json()["accepted"] is False
    assert daemon.status()["queued"] == 0


def test_killed_after_ack_completes_after_restart(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config()
    daemon = daemon_factory(config)
    with _holding_sync_lock(config):
        answer = httpx.post(f"{daemon.url}/hooks/session-end", json=_session_end(), timeout=5)
        assert answer.status_code == 202
        daemon.kill()  # acknowledged, not yet uploaded
    assert manifests(minio_client, s3_bucket) == []
    again = daemon_factory(config)
    until(lambda: manifests(minio_client, s3_bucket), what="the resumed upload")
    history = until(lambda: _status_via_mcp(again.url)["history"], what="history")
    assert "session-end" in history[0]["triggered_by"] and history[0]["success"]


def test_sigterm_mid_sync_keeps_the_request_for_the_next_start(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config()
    daemon = daemon_factory(config)
    with _holding_sync_lock(config):
        answer = httpx.post(f"{daemon.url}/hooks/session-end", json=_session_end(), timeout=5)
        assert answer.status_code == 202
        until(lambda: daemon.status()["running"], what="the sync to start")
        started = time.monotonic()
        # As Claude Code does: SIGINT, then SIGTERM while the daemon is shutting down.
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGINT)
        until(lambda: _refused(daemon.url), what="the HTTP server to stop")
        assert daemon.stop() == 0  # not killed by the second signal: 1 s grace, then exit
        assert time.monotonic() - started < 15
    assert manifests(minio_client, s3_bucket) == []
    again = daemon_factory(config)
    until(lambda: manifests(minio_client, s3_bucket), what="the resumed upload")
    assert again.stop() == 0


def test_a_tool_call_waiting_at_sigterm_gets_an_answer_and_its_request_stays_queued(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
    minio_client: Minio, s3_bucket: str,
) -> None:
    """Before, the HTTP server stopped first and dropped the caller's connection."""
    import anyio

    config = s3_config()
    daemon = daemon_factory(config)
    assert daemon.proc is not None
    proc = daemon.proc

    async def call_then_terminate() -> dict[str, Any]:
        with anyio.fail_after(20):  # far less than the sync's budget: an answer, not a wait
            return await _call_then_terminate()

    async def _call_then_terminate() -> dict[str, Any]:
        async with Client(f"{daemon.url}/mcp") as client, anyio.create_task_group() as tg:
            answer: dict[str, Any] = {}
            # As Claude Code does, list the tools first: the SDK validates a tool's
            # structured result against its schema, and lists the tools for it when
            # it has none, which a daemon gone after answering no longer can.
            await client.list_tools()

            async def call() -> None:
                result = await client.call_tool("sync_to_akosha", {})
                answer.update(result.structured_content or {"none": True})

            tg.start_soon(call)
            await anyio.to_thread.run_sync(
                lambda: until(lambda: daemon.status()["running"], what="the sync to start"))
            proc.send_signal(signal.SIGTERM)
        return answer

    with _holding_sync_lock(config):  # the sync cannot finish within the 1 s grace
        answer = anyio.run(call_then_terminate)
        assert proc.wait(30) == 0
        assert manifests(minio_client, s3_bucket) == []
    assert answer["success"] is False and answer["queued"] is True, answer
    assert "shutting down" in answer["error"], answer
    # The request was kept, and the daemon left a one-shot drain to run it (before, it
    # waited for the next start: the last session end of a day waited for the next day).
    until(lambda: manifests(minio_client, s3_bucket), what="the drain's upload")


def test_hook_command_says_in_one_line_when_the_queue_cannot_be_written(
    make_config: MakeConfig, tmp_path: Path
) -> None:
    """The state folder cannot be made (a file is in the way; a full disk or a read-only
    folder fail the same way): one line naming the folder and what to do, not a
    traceback, and a non-zero exit, since the session end was not kept."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = make_config(daemon_port=9, state_dir=str(blocker / "state"))
    toml = write_toml(config, tmp_path / "hook.toml")
    done = subprocess.run([EXE, "--config", str(toml), "hook", "session-end"],
                          input=json.dumps(_session_end()), text=True, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not be queued in" in lines[0], done.stderr
    assert str(blocker / "state") in lines[0] and "Traceback" not in done.stderr


def test_hook_command_without_daemon_records_and_drains(
    s3_config: MakeConfig, tmp_path: Path, minio_client: Minio, s3_bucket: str
) -> None:
    config = s3_config(daemon_port=9)  # nothing listens there
    toml = write_toml(config, tmp_path / "hook.toml")
    deep = subprocess.run([EXE, "--config", str(toml), "hook", "session-end"],
                          input="[" * 30_000 + "]" * 30_000, text=True, capture_output=True,
                          timeout=30, check=False)
    assert (deep.returncode, "nested too deeply" in deep.stderr) == (0, True), deep.stderr
    started = time.monotonic()
    done = subprocess.run([EXE, "--config", str(toml), "hook", "session-end"],
                          input=json.dumps(_session_end()), text=True, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 5
    # The detached drain uploads it.
    until(lambda: manifests(minio_client, s3_bucket), what="the drained upload")


def test_hook_command_forwards_to_a_running_daemon(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon], tmp_path: Path,
) -> None:
    config = s3_config()
    daemon = daemon_factory(config)
    with _holding_sync_lock(config):
        done = subprocess.run([EXE, "--config", str(daemon.toml), "hook", "session-end"],
                              input=json.dumps(_session_end()), text=True,
                              capture_output=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        status = until(lambda: daemon.status()["running"] and daemon.status(),
                        what="the forwarded request")
        assert status["running"]


def test_install_claude_prints_and_writes(tmp_path: Path, make_config: MakeConfig) -> None:
    config = make_config()
    toml = write_toml(config, tmp_path / "c.toml")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    shown = subprocess.run([EXE, "--config", str(toml), "install", "claude", "--mode", "http"],
                           env=env, capture_output=True, text=True, check=True)
    assert '"type": "http"' in shown.stdout and "/hooks/session-end" in shown.stdout
    assert not (tmp_path / "home" / ".claude.json").exists()
    for _ in range(2):  # idempotent
        subprocess.run([EXE, "--config", str(toml), "install", "claude", "--mode", "http",
                        "--write"], env=env, capture_output=True, text=True, check=True)
    servers = json.loads((tmp_path / "home" / ".claude.json").read_text())["mcpServers"]
    assert servers["akosha-sync"]["url"].endswith("/mcp")
    settings = json.loads((tmp_path / "home" / ".claude" / "settings.json").read_text())
    assert len(settings["hooks"]["SessionEnd"]) == 1


def test_docker_compose_structure() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"minio", "create-bucket", "akosha-sync"} <= set(services)
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
    env = services["akosha-sync"]["environment"]
    assert env["AKOSHA_SYNC_CLOUD_ENDPOINT"] == "http://minio:9000"
    assert env["AKOSHA_SYNC_CLOUD_BUCKET"] in services["create-bucket"]["entrypoint"]
    assert "--transport" in services["akosha-sync"]["command"]
    assert "http" in services["akosha-sync"]["command"]
    assert (ROOT / "Dockerfile").exists()


def test_hook_command_imports_nothing_heavy(tmp_path: Path) -> None:
    """The command hook runs inside Claude Code's 1.5 s budget: no MCP SDK, DuckDB,
    obstore or server stack may load on its path (forward, or record and drain)."""
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'state_dir = "{tmp_path / "state"}"\ndata_dir = "{tmp_path / "empty"}"\n'
        f'log_file = "{tmp_path / "log"}"\ndaemon_port = 9\n'
        'akosha_url = "http://127.0.0.1:9/mcp"\n'
    )
    code = (
        "import io, json, sys\n"
        "from akosha_sync.cli import main\n"
        f"sys.argv = ['akosha-sync', '--config', {str(toml)!r}, 'hook', 'session-end']\n"
        f"sys.stdin = io.StringIO({json.dumps(json.dumps(_session_end()))})\n"
        "rc = main()\n"
        "heavy = ('mcp', 'duckdb', 'obstore', 'uvicorn', 'starlette', 'structlog', 'anyio',"
        " 'httpx', 'zstandard')\n"
        "print(json.dumps({'rc': rc, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"rc": 0, "loaded": []}
    # The request was recorded durably for the detached drain (whatever its state now).
    import sqlite3

    con = sqlite3.connect(tmp_path / "state" / "queue.sqlite3")
    try:
        assert con.execute("SELECT count(*) FROM requests").fetchone() == (1,)
    finally:
        con.close()
