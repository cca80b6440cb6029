"""Security (issue 9): the token on every route, the hook route's browser and DNS
rebinding checks, no non-loopback daemon without a token, private file modes, no
plain-http Akosha token, the session token, and one scrubber for every output.

Everything runs over real transports: a real `akosha-sync serve` process, the real
SeaweedFS and the real Akosha.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.logs import configure_logging
from akosha_sync.redact import REDACTED, Scrubber
from akosha_sync.repository.store import RetryPolicy, with_retries
from akosha_sync.sync.protocol import CloudUploadError
from akosha_sync.sync.runner import run_sync
from support.akosha import AkoshaServer
from support.configfile import write_toml
from support.logs import drop_our_log_handlers
from support.seaweedfs import SeaweedFS
from support.wait import until
from test_server import EXE, ROOT, Daemon, _session_end, daemon_factory

__all__ = ["daemon_factory"]  # the fixture, re-used from test_server

MakeConfig = Callable[..., AkoshaSyncConfig]
TOKEN = "daemon-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}


# ------------------------------------------------------------ every route
def test_token_guards_every_route_but_health(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    daemon = daemon_factory(s3_config(daemon_token=TOKEN))
    url = daemon.url
    with httpx.Client(base_url=url, timeout=5) as http:
        assert http.get("/health").status_code == 200
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"}}}
        mcp_headers = {**JSON, "Accept": "application/json, text/event-stream"}
        for bad in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            assert http.post("/mcp", json=init, headers={**mcp_headers, **bad}
                             ).status_code == 401, bad
            assert http.get("/sse", headers=bad).status_code == 401, bad
            assert http.post("/messages/?session_id=" + uuid.uuid4().hex, json=init,
                             headers=bad).status_code == 401, bad
            assert http.post("/hooks/session-end", json=_session_end(),
                             headers=bad).status_code == 401, bad
        # Not ASCII: compared as bytes, a 401 (compare_digest on str raised: a 500).
        odd = http.post("/hooks/session-end", json=_session_end(),
                        headers={"Authorization": "Bearer tökén-✓".encode()})
        assert odd.status_code == 401
        assert http.post("/mcp", json=init, headers={
            **mcp_headers, "Authorization": "Bearer \xff\xfe".encode("latin-1")}
        ).status_code == 401

    async def talk() -> None:
        headers = dict(AUTH)
        async with Client(streamable_http_client(
            f"{url}/mcp", http_client=create_mcp_http_client(headers=headers)
        )) as client:
            status = (await client.call_tool("akosha_sync_status", {})).structured_content
            assert status is not None and status["daemon"]["transport"] == "http"
        async with Client(sse_client(f"{url}/sse", headers=headers)) as client:
            assert (await client.call_tool("akosha_sync_status", {})).structured_content

    anyio.run(talk)
    answer = httpx.post(f"{url}/hooks/session-end", json=_session_end(), headers=AUTH,
                        timeout=5)
    assert answer.status_code == 202
    assert TOKEN not in daemon.config.log_path.read_text()


def test_hook_command_forwards_with_the_token(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    """`akosha-sync hook session-end` reaches a token-guarded daemon (it does not fall
    back to its own queue and drain)."""
    daemon = daemon_factory(s3_config(daemon_token=TOKEN))
    done = subprocess.run([EXE, "--config", str(daemon.toml), "hook", "session-end"],
                          input=json.dumps(_session_end("forwarded")), text=True,
                          capture_output=True, timeout=30, check=False)
    assert done.returncode == 0 and "answered" not in done.stderr, done.stderr
    history = until(lambda: _status_via_mcp_with_token(daemon.url)["history"],
                     what="the forwarded request's sync")
    assert "session-end" in history[0]["triggered_by"]


def _status_via_mcp_with_token(url: str) -> dict[str, Any]:
    async def ask() -> dict[str, Any]:
        async with Client(streamable_http_client(
            f"{url}/mcp", http_client=create_mcp_http_client(headers=AUTH)
        )) as client:
            data = (await client.call_tool("akosha_sync_status", {})).structured_content
            assert data is not None
            return data

    return anyio.run(ask)


# ------------------------------------------------------------ the hook route
def test_hook_route_refuses_browsers_and_rebinding(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    daemon = daemon_factory(s3_config())
    port = daemon.url.rsplit(":", 1)[1]
    body = json.dumps(_session_end()).encode()
    with httpx.Client(base_url=daemon.url, timeout=5) as http:
        # What a web page can send without a CORS preflight.
        plain = http.post("/hooks/session-end", content=body,
                          headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415 and "application/json" in plain.json()["error"]
        form = http.post("/hooks/session-end", content=body,
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.status_code == 415
        assert http.post("/hooks/session-end", content=body).status_code == 415
        evil = http.post("/hooks/session-end", content=body,
                         headers={**JSON, "Origin": "https://evil.example"})
        assert evil.status_code == 403 and "Origin" in evil.json()["error"]
        null = http.post("/hooks/session-end", content=body, headers={**JSON, "Origin": "null"})
        assert null.status_code == 403
        rebound = http.post("/hooks/session-end", content=body,
                            headers={**JSON, "Host": f"evil.example:{port}"})
        assert rebound.status_code == 421
        assert daemon.status()["queued"] == 0  # none of those was recorded
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            ok = http.post("/hooks/session-end", content=body, headers={
                **JSON, "Host": host, "Origin": f"http://{host}"})
            assert ok.status_code == 202, (host, ok.text)
        charset = http.post("/hooks/session-end", content=body,
                            headers={"Content-Type": "application/json; charset=utf-8"})
        assert charset.status_code == 202


def test_hook_body_limit_applies_while_streaming(
    s3_config: MakeConfig, daemon_factory: Callable[[AkoshaSyncConfig], Daemon]
) -> None:
    """A chunked body that never ends is refused once it passes the limit, instead of
    being read whole first (which would wait for ever here)."""
    daemon = daemon_factory(s3_config())
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /hooks/session-end HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 16384
        for _ in range(6):  # 96 KiB > 64 KiB, and no final 0-length chunk
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        ready, _, _ = select.select([sock], [], [], 10)
        assert ready, "no answer while the body was still streaming"
        assert sock.recv(200).startswith(b"HTTP/1.1 413")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(  # declares 1 GB, sends 2 bytes: refused on the header alone
            b"POST /hooks/session-end HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{}"
        )
        ready, _, _ = select.select([sock], [], [], 10)
        assert ready and sock.recv(200).startswith(b"HTTP/1.1 413")
    assert daemon.status()["status"] == "ok"


# ------------------------------------------------------------ non-loopback
def test_serve_refuses_a_public_address_without_a_token(
    s3_config: MakeConfig, tmp_path: Path,
    daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
) -> None:
    config = s3_config()
    toml = write_toml(config, tmp_path / "public.toml")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [EXE, "--config", str(toml), "serve", "--transport", "http", "--host", "0.0.0.0",  # noqa: S104
         "--port", "0"], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done.stderr
    assert "daemon_token" in done.stderr and "AKOSHA_SYNC_DAEMON_TOKEN" in done.stderr
    assert not (config.state_path / "daemon.json").exists()
    # With a token it starts on all addresses.
    daemon = daemon_factory(s3_config(daemon_host="0.0.0.0",  # noqa: S104
                                          daemon_token=TOKEN))
    assert httpx.get(f"http://127.0.0.1:{daemon.url.rsplit(':', 1)[1]}/health",
                     timeout=5).status_code == 200
    assert daemon.stop() == 0


def test_image_and_compose_set_a_token(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["akosha-sync"]["environment"]
    assert env["AKOSHA_SYNC_DAEMON_TOKEN"].startswith("${AKOSHA_SYNC_DAEMON_TOKEN:?")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["akosha-sync-entrypoint"]' in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/akosha-sync-entrypoint" in dockerfile
    script = ROOT / "docker" / "entrypoint.sh"
    env_none = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
                "AKOSHA_SYNC_STATE_DIR": str(tmp_path / "state")}
    show = ["sh", "-c", 'printf %s "$AKOSHA_SYNC_DAEMON_TOKEN"']
    first = subprocess.run(["sh", str(script), *show], env=env_none, capture_output=True,
                           text=True, check=True)
    assert len(first.stdout) >= 32 and "generated" in first.stderr
    token_file = tmp_path / "state" / "daemon-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    again = subprocess.run(["sh", str(script), *show], env=env_none, capture_output=True,
                           text=True, check=True)
    assert again.stdout == first.stdout  # kept across restarts
    given = subprocess.run(["sh", str(script), *show],
                           env={**env_none, "AKOSHA_SYNC_DAEMON_TOKEN": "mine-123456"},
                           capture_output=True, text=True, check=True)
    assert given.stdout == "mine-123456"


# ------------------------------------------------------------ file modes
def _modes(*roots: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for root in roots:
        if not root.exists():
            continue
        found[str(root)] = stat.S_IMODE(root.stat().st_mode)
        for path in root.rglob("*"):
            try:
                found[str(path)] = stat.S_IMODE(path.lstat().st_mode)
            except FileNotFoundError:
                continue  # removed while we looked (a finished snapshot)
    return found


def _wrong_modes(modes: dict[str, int]) -> dict[str, str]:
    return {p: oct(m) for p, m in modes.items()
            if m != (0o700 if Path(p).is_dir() else 0o600) and Path(p).exists()}


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_everything_we_create_is_private(
    umask_022: None, s3_config: MakeConfig, akosha: AkoshaServer, tmp_path: Path,
    daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
) -> None:
    home = tmp_path / "home"
    config = s3_config(system_id=f"modes-{uuid.uuid4().hex[:8]}", akosha_url=akosha.url,
                       state_dir=str(home / "state"),
                       log_file=str(home / "logs" / "akosha-sync.log"))
    configure_logging(config, stderr_level=None)
    seen: dict[str, int] = {}
    staged: set[str] = set()

    def watch(phase: str, done: int, total: int) -> None:
        # Snapshots exist only while a sync runs (memories.json is streamed, never staged).
        modes = _modes(config.state_path)
        seen.update(modes)
        staged.update(p for p in modes if "/snapshots/" in p)

    for method in ("cloud", "http"):
        result = anyio.run(lambda m=method: run_sync(config, method=m, progress=watch))
        assert result["success"], result
    assert any(p.endswith(".duckdb") for p in staged), sorted(staged)
    assert not any(p.endswith("memories.json") for p in seen), sorted(seen)
    # verify (another process) keeps its check record in the state folder.
    subprocess.run([EXE, "--config",
                    str(write_toml(config, tmp_path / "modes.toml")), "verify"], check=True,
                   capture_output=True)
    seen.update(_modes(config.state_path))
    # The daemon (another process, same umask): queue, daemon file, its log lines.
    daemon = daemon_factory(config)
    answer = httpx.post(f"{daemon.url}/hooks/session-end", json=_session_end(), timeout=5)
    assert answer.status_code == 202
    until(lambda: daemon.status()["queued"] == 0 and not daemon.status()["running"],
           what="the hook's sync")
    seen.update(_modes(config.state_path, config.log_path.parent))
    assert daemon.stop() == 0
    seen.update(_modes(config.state_path, config.log_path.parent))
    names = {Path(p).name for p in seen}
    for expected in ("queue.sqlite3", "delivered.duckdb", "akosha-sync.log", "sync.lock",
                     "targets", "snapshots", "last_verify.json"):
        assert any(n == expected for n in names), (expected, sorted(names))
    assert any(p.endswith(".json") and "/targets/" in p for p in seen)
    assert _wrong_modes(seen) == {}
    drop_our_log_handlers()


# ------------------------------------------------------------ plain http, session token
def test_plain_http_akosha_url_to_a_remote_host_is_refused(make_config: MakeConfig) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, nothing must even be tried there.
    config = make_config(akosha_url="http://192.0.2.10:8682/mcp", akosha_token="tok-abcdef12",
                         force_method="http")
    assert any("plain http" in p and "akosha_url" in p for p in config.validate())
    started = time.monotonic()
    result = anyio.run(lambda: run_sync(config, method="http"))
    assert not result["success"] and "plain http" in result["error"]
    assert time.monotonic() - started < 5  # refused, not a connect timeout
    for fine in ({"akosha_url": "http://localhost:8682/mcp"},
                 {"akosha_url": "https://akosha.example/mcp"},
                 {"akosha_url": "http://192.0.2.10:8682/mcp", "allow_plain_http": True}):
        assert not any("plain http" in p for p in make_config(**fine).validate()), fine


class _RecordingProxy:
    """A TCP proxy of our own in front of the real SeaweedFS that keeps what the
    client sent, to see the headers obstore put on the wire."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True
                             ).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True
                             ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.sent.extend(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop = True
        self.server.close()


@pytest.mark.parametrize("source", ["config", "environment"])
def test_session_token_is_sent_and_never_shown(
    source: str, s3_config: MakeConfig, seaweedfs: SeaweedFS, s3_credentials: Any,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    session = "IQoJb3JpZ2luX2VjE" + uuid.uuid4().hex * 2
    host, port = seaweedfs.endpoint.removeprefix("http://").rsplit(":", 1)
    proxy = _RecordingProxy((host, int(port)))
    try:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        if source == "config":
            config = s3_config(cloud_endpoint=endpoint, session_token=session)
        else:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_credentials.access_key)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_credentials.secret_key)
            monkeypatch.setenv("AWS_SESSION_TOKEN", session)
            config = s3_config(cloud_endpoint=endpoint, access_key_id="", secret_access_key="")
        configure_logging(config, stderr_level=None)
        assert config.redacted()["session_token"] in ("", REDACTED)
        result = anyio.run(lambda: run_sync(config, method="cloud"))
    finally:
        proxy.close()
    wire = bytes(proxy.sent).lower()
    assert b"x-amz-security-token: " + session.lower().encode() in wire
    assert session not in json.dumps(result)
    assert session not in config.log_path.read_text()
    assert session not in repr(config)
    drop_our_log_handlers()


# ------------------------------------------------------------ one scrubber
def test_one_scrubber_keeps_every_secret_out_of_errors_results_and_logs(
    make_config: MakeConfig, monkeypatch: pytest.MonkeyPatch,
) -> None:
    env_session = "ENV-SESSION-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SESSION_TOKEN", env_session)
    session = "CFG-SESSION-" + uuid.uuid4().hex
    secrets = {"secret": "CFG-SECRET-" + uuid.uuid4().hex, "akosha": "AKOSHA-" + uuid.uuid4().hex,
               "daemon": "DAEMON-" + uuid.uuid4().hex, "session": session,
               "env_session": env_session}
    config = make_config(
        cloud_bucket="nowhere", cloud_endpoint="http://127.0.0.1:9",
        access_key_id="AKIA" + "X" * 16, secret_access_key=secrets["secret"],
        session_token=session, akosha_token=secrets["akosha"], daemon_token=secrets["daemon"],
        # A URL that carries a secret, as some proxies want: shown in every HTTP error.
        akosha_url=f"http://127.0.0.1:9/mcp?key={session}", max_retries=1,
    )
    configure_logging(config, stderr_level=None)

    # The HTTP method: its result and error (Akosha is down: a real connect failure).
    http_result = anyio.run(lambda: run_sync(config, method="http"))
    assert not http_result["success"]

    # The store: an error whose text carries every secret, injected at the seam.
    leaky = " ".join(secrets.values())

    async def fails() -> None:
        raise ConnectionResetError(f"upstream said: {leaky}")

    async def store_error() -> str:
        try:
            await with_retries(fails, config=config, what="probing",
                               policy=RetryPolicy(1, 0.01))
        except CloudUploadError as exc:
            return str(exc)
        raise AssertionError("no error")

    store_message = anyio.run(store_error)
    assert "upstream said" in store_message

    # The logs: a structured event with secrets in values, keys and an exception.
    import structlog

    log = structlog.get_logger("test")
    try:
        raise RuntimeError(leaky)
    except RuntimeError:
        log.exception("boom", detail=leaky, token="x" * 8, nested={"authorization": "y" * 8})
    for handler in logging.getLogger().handlers:
        handler.flush()
    log_text = config.log_path.read_text()
    assert "boom" in log_text and REDACTED in log_text

    outputs = {"http result": json.dumps(http_result), "store error": store_message,
               "log": log_text}
    for where, text in outputs.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} leaked into the {where}"
    drop_our_log_handlers()


def test_a_url_password_with_a_slash_is_refused_and_never_shown(
    make_config: MakeConfig, tmp_path: Path,
) -> None:
    """AWS secret keys often hold a '/'. In ``https://user:pa/ss@host`` a URL parser ends
    the server at the '/' and finds no credentials: before, the password was shown by
    `status`, in the HTTP method's error ('Port could not be cast to integer value as
    ...'), in the log and the queue's history, and `doctor` crashed with a traceback."""
    from support.configfile import write_toml
    from support.faults import EXE

    secret = "SLASHED" + uuid.uuid4().hex[:8]
    config = make_config(
        akosha_url=f"https://someone:{secret}/rest@akosha.example.com/mcp",
        cloud_endpoint=f"https://AKIAEXAMPLEKEY12345:{secret}/more+x@s3.example.com",
    )
    problems = config.validate()
    assert [p for p in problems if "password holds a '/'" in p] == [
        p for p in problems if p.startswith(("cloud_endpoint has", "akosha_url has"))]
    assert len([p for p in problems if "password holds a '/'" in p]) == 2
    assert secret in " ".join(config.secrets())
    toml = write_toml(config, tmp_path / "c.toml")
    seen = ""
    for args in (["status", "--json"], ["status"], ["sync", "--json"],
                 ["sync", "--method", "http", "--json"], ["doctor"]):
        done = subprocess.run([EXE, "--config", str(toml), *args], capture_output=True,
                              text=True, timeout=60, check=False)
        seen += done.stdout + done.stderr
    assert "password holds a '/'" in seen and "Traceback" not in seen
    assert secret not in seen
    assert not config.log_path.exists() or secret not in config.log_path.read_text()
    for path in config.state_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_token_given_as_the_url_user_is_a_secret(make_config: MakeConfig) -> None:
    token = "TOKEN" + uuid.uuid4().hex
    config = make_config(akosha_url=f"https://{token}@akosha.example.com/mcp")
    assert token in config.secrets()
    assert token not in json.dumps(config.redacted())


def test_scrubber_cleans_nested_values_and_secret_keys() -> None:
    scrub = Scrubber(["s3cr3t-value", "s3cr3t"])
    cleaned = scrub.clean({"a": ["x s3cr3t-value y", ("s3cr3t",)], "Authorization": "Bearer z",
                           "session_token": "t", "n": 3, "empty_token": ""})
    assert cleaned == {"a": [f"x {REDACTED} y", [REDACTED]], "Authorization": REDACTED,
                       "session_token": REDACTED, "n": 3, "empty_token": ""}
