"""The HTTP fallback against the real Akosha 0.11, confirmed through Akosha itself.

Akosha has no read-back: ``AkoshaServer.held_ids`` re-sends ids and reads the
duplicate-key refusals, and stores the ids it did not hold. So each test checks
held ids once, at its end. Memory ids are global in Akosha: every test that shares
the session's server uses a system id of its own.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import SampleInfo, add_conversations
from akosha_sync.sync import http as http_module
from akosha_sync.sync.http import HttpSyncMethod
from akosha_sync.sync.protocol import HTTPSyncError
from akosha_sync.sync.records import memory_id
from akosha_sync.sync.state import target_id
from support.akosha import AkoshaServer, pick_free_port

MakeConfig = Callable[..., AkoshaSyncConfig]

_TABLES = {
    "conversation": ("reflection_path", "conversations_v2"),
    "reflection": ("reflection_path", "reflections_v2"),
    "entity": ("knowledge_graph_path", "kg_entities"),
}


def _sid() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _source_ids(sample: SampleInfo, kind: str, *, embedded: bool = True) -> list[str]:
    """Ids straight from the live database (WAL included), sorted like the sync sends them."""
    attr, table = _TABLES[kind]
    condition = "IS NOT NULL" if embedded else "IS NULL"
    con = duckdb.connect(str(getattr(sample, attr)), read_only=True)
    try:
        rows = con.execute(
            f"SELECT id FROM {table} WHERE embedding {condition} ORDER BY id"
        ).fetchall()
    finally:
        con.close()
    return [str(r[0]) for r in rows]


def _memory_ids(sid: str, kind: str, ids: list[str]) -> list[str]:
    return [memory_id(sid, kind, i) for i in ids]


def _sync(method: HttpSyncMethod, **kwargs: Any) -> dict[str, Any]:
    return anyio.run(lambda: method.sync(**kwargs))


def _held(akosha: AkoshaServer, ids: list[str]) -> set[str]:
    return anyio.run(akosha.held_ids, ids)


# ----------------------------------------------------------------- delivery
def test_sync_stores_records_then_sends_only_new_ones(
    akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo
) -> None:
    sid = _sid()
    token = "tok-" + uuid.uuid4().hex  # Akosha 0.11 ignores it on ingestion; must stay hidden
    method = HttpSyncMethod(make_config(system_id=sid, akosha_url=akosha.url, akosha_token=token))
    expected = {kind: _source_ids(sample, kind) for kind in _TABLES}
    no_embedding = _source_ids(sample, "entity", embedded=False)
    assert len(expected["conversation"]) == 205  # 200 + 5 only in the WAL
    assert no_embedding  # the sample has entities Akosha cannot take

    assert method.is_available()
    first = _sync(method)
    assert first["success"], first["error"]
    assert first["method"] == "http"
    assert first["error"] is None
    assert first["files_uploaded"] == []
    assert re.fullmatch(rf"\d{{8}}_\d{{6}}_{sid}", first["upload_id"])
    counts = {kind: len(ids) for kind, ids in expected.items()}
    details = first["details"]
    assert details["sent"] == counts
    assert details["stored"] == counts
    assert details["duplicates"] == {} and details["failed"] == {}
    assert details["skipped"]["relation"]["count"] == sample.row_counts["kg_relationships"]
    assert details["skipped"]["no_embedding"]["count"] == len(no_embedding)
    assert "embedding" in details["skipped"]["no_embedding"]["reason"]
    assert first["conversation_count"] == sample.row_counts["conversations_v2"]
    assert first["new_conversation_count"] == counts["conversation"]
    assert first["bytes_transferred"] > 4000 * sum(counts.values())  # ~5 KB a memory
    assert details["akosha_url"] == akosha.url
    assert token not in json.dumps(first)

    second = _sync(method)
    assert second["success"]
    assert second["details"]["sent"] == {}
    assert second["bytes_transferred"] == 0
    assert second["details"]["calls"] == 0
    # Skipped rows are reported every time, never silently dropped.
    assert second["details"]["skipped"]["no_embedding"]["count"] == len(no_embedding)

    new_ids = add_conversations(sample.data_dir, 7, seed=11)
    third = _sync(method)
    assert third["details"]["sent"] == {"conversation": 7}
    assert third["details"]["stored"] == {"conversation": 7}

    # Akosha itself: everything sent is held (WAL rows and new rows included) and
    # the entities without an embedding are not.
    rng = random.Random(0)
    probe = (
        _memory_ids(sid, "conversation", list(sample.wal_conversation_ids))
        + _memory_ids(sid, "conversation", rng.sample(expected["conversation"], 30))
        + _memory_ids(sid, "conversation", new_ids)
        + _memory_ids(sid, "reflection", rng.sample(expected["reflection"], 10))
        + _memory_ids(sid, "entity", expected["entity"])
    )
    skipped = _memory_ids(sid, "entity", no_embedding)
    assert _held(akosha, probe + skipped) == set(probe)


def test_the_same_akosha_spelled_another_way_is_the_same_channel(
    akosha: AkoshaServer, make_config: MakeConfig, tmp_path: Path
) -> None:
    """``HTTP://127.0.0.1:PORT/mcp/`` is the Akosha ``http://127.0.0.1:PORT/mcp`` is:
    what was delivered to one spelling is not sent again to the other, and what an
    earlier version recorded under the URL as written (its channel's old name) counts."""
    sid = _sid()
    respelled = akosha.url.replace("http://", "HTTP://") + "/"
    first = _sync(HttpSyncMethod(make_config(system_id=sid, akosha_url=respelled)))
    assert first["success"], first["error"]
    assert first["details"]["sent"]
    plain = _sync(HttpSyncMethod(make_config(system_id=sid, akosha_url=akosha.url)))
    assert plain["success"] and plain["details"]["sent"] == {}

    # As an earlier version left it: the records under the URL as written.
    normal = target_id("http", akosha.url, sid)
    spelled = target_id("http", respelled.rstrip("/"), sid)
    con = duckdb.connect(str(tmp_path / "state" / "delivered.duckdb"))
    con.execute("UPDATE delivered SET channel = ? WHERE channel = ?", [spelled, normal])
    con.close()
    again = _sync(HttpSyncMethod(make_config(system_id=sid, akosha_url=respelled)))
    assert again["success"], again["error"]
    assert again["details"]["sent"] == {} and again["details"]["calls"] == 0
    con = duckdb.connect(str(tmp_path / "state" / "delivered.duckdb"), read_only=True)
    channels = {c for (c,) in con.execute("SELECT DISTINCT channel FROM delivered").fetchall()}
    con.close()
    assert channels == {normal}


def test_batches_are_bounded_by_items_and_bytes(
    akosha: AkoshaServer,
    make_config: MakeConfig,
    sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    method = HttpSyncMethod(
        make_config(system_id=_sid(), akosha_url=akosha.url, http_batch_size=60)
    )
    events: list[tuple[str, int, int]] = []
    result = _sync(method, progress=lambda *event: events.append(event))
    # 205 conversations, 52 reflections, 28 entities at <= 60 a call
    assert result["details"]["calls"] == 4 + 1 + 1
    sends = [e for e in events if e[0] == "send:conversation"]
    assert [done for _, done, _ in sends] == [60, 120, 180, 205]

    budget = 64 * 1024
    monkeypatch.setattr(http_module, "_MAX_BATCH_BYTES", budget)
    add_conversations(sample.data_dir, 40, seed=3)
    result = _sync(method)
    assert result["details"]["stored"] == {"conversation": 40}
    # ~5 KB a memory: 12 fit in 64 KiB, so 40 need 4 calls.
    assert result["details"]["calls"] >= result["bytes_transferred"] / budget
    assert result["details"]["calls"] == 4


def test_lost_local_state_resends_and_counts_duplicates_as_delivered(
    akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    config = make_config(system_id=_sid(), akosha_url=akosha.url)
    first = _sync(HttpSyncMethod(config))
    assert first["success"]
    (tmp_path / "state" / "delivered.duckdb").unlink()  # the progress store is gone

    again = _sync(HttpSyncMethod(config))
    assert again["success"], again["error"]
    assert again["details"]["stored"] == {}
    assert again["details"]["duplicates"] == first["details"]["stored"]
    assert again["details"]["failed"] == {}
    # Duplicates were marked delivered: nothing goes a third time.
    assert _sync(HttpSyncMethod(config))["details"]["sent"] == {}


def test_refused_record_is_reported_and_sent_again(
    akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo
) -> None:
    sid = _sid()
    con = duckdb.connect(str(sample.reflection_path))
    try:
        # Akosha refuses an empty text ("Missing required field").
        con.execute(
            "INSERT INTO conversations_v2 SELECT * REPLACE ('empty-text' AS id, '' AS content) "
            "FROM conversations_v2 LIMIT 1"
        )
    finally:
        con.close()
    method = HttpSyncMethod(make_config(system_id=sid, akosha_url=akosha.url))
    result = _sync(method)
    assert result["success"] is False
    bad = memory_id(sid, "conversation", "empty-text")
    assert result["details"]["failed"] == {"conversation": 1}
    assert result["details"]["stored"]["conversation"] == 205
    [failure] = result["details"]["failures"]
    assert failure["memory_id"] == bad
    assert "Missing required field" in failure["error"]
    assert bad in result["error"] and "sent again" in result["error"]

    again = _sync(method)
    assert again["details"]["sent"] == {"conversation": 1}
    assert again["details"]["failed"] == {"conversation": 1}


# ------------------------------------------------------------- availability
class _Recorder:
    """A tiny HTTP server: answers per path and method, records what it was sent."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, bytes]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(
                    (self.command, self.path, dict(self.headers.items()), body)
                )
                status, answer = recorder.answers.get((self.command, self.path), (404, b"nope"))
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Callable[..., _Recorder]]:
    made: list[_Recorder] = []

    def make(answers: dict[tuple[str, str], tuple[int, bytes]]) -> _Recorder:
        made.append(_Recorder(answers))
        return made[-1]

    yield make
    for server in made:
        server.close()


def _sessions(server: _Recorder) -> int:
    """MCP sessions attempted: one ``initialize`` request each."""
    return sum(b'"method":"initialize"' in body for method, _, _, body in server.requests)


_HEALTH_OK = (200, b'{"status":"ok","service":"akosha"}')


def test_is_available_only_for_a_healthy_akosha(
    akosha: AkoshaServer, make_config: MakeConfig, recorder: Callable[..., _Recorder]
) -> None:
    assert HttpSyncMethod(make_config(akosha_url=akosha.url)).is_available()

    refused = HttpSyncMethod(make_config(akosha_url=f"http://127.0.0.1:{pick_free_port()}/mcp"))
    assert refused.is_available() is False

    not_found = recorder({})
    assert HttpSyncMethod(make_config(akosha_url=not_found.url)).is_available() is False
    assert not_found.requests[0][:2] == ("GET", "/health")

    unhealthy = recorder({("GET", "/health"): (200, b'{"status":"degraded"}')})
    assert HttpSyncMethod(make_config(akosha_url=unhealthy.url)).is_available() is False

    # A server that accepts connections and never answers: False after ~1 s.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        method = HttpSyncMethod(make_config(akosha_url=f"http://127.0.0.1:{port}/mcp"))
        started = time.monotonic()
        assert method.is_available() is False
        assert time.monotonic() - started < 3


def test_is_available_is_cached_and_sends_the_token(
    make_config: MakeConfig, recorder: Callable[..., _Recorder]
) -> None:
    server = recorder({("GET", "/health"): _HEALTH_OK})
    method = HttpSyncMethod(make_config(akosha_url=server.url, akosha_token="s3cret-token"))
    assert method.is_available() and method.is_available()
    assert len(server.requests) == 1  # the second answer came from the cache
    assert server.requests[0][2]["Authorization"] == "Bearer s3cret-token"


def test_token_goes_as_bearer_and_never_into_errors(
    make_config: MakeConfig, recorder: Callable[..., _Recorder]
) -> None:
    token = "tok-" + uuid.uuid4().hex
    server = recorder({("GET", "/health"): _HEALTH_OK, ("POST", "/mcp"): (401, b"{}")})
    method = HttpSyncMethod(make_config(akosha_url=server.url, akosha_token=token))
    with pytest.raises(HTTPSyncError) as failed:
        _sync(method)
    posts = [r for r in server.requests if r[0] == "POST"]
    assert posts and all(h["Authorization"] == f"Bearer {token}" for _, _, h, _ in posts)
    assert _sessions(server) == 1  # refused credentials are not retried
    message = str(failed.value)
    assert server.url in message and "akosha_token" in message
    assert token not in message and token not in repr(failed.value.original)

    # 5xx is retried (max_retries=1: two sessions), then reported with the URL.
    server.answers[("POST", "/mcp")] = (503, b"{}")
    server.requests.clear()
    with pytest.raises(HTTPSyncError, match=r"HTTP 503.*tried 2 times"):
        _sync(method)
    assert _sessions(server) == 2


def test_refused_connection_fails_with_the_url(make_config: MakeConfig) -> None:
    url = f"http://127.0.0.1:{pick_free_port()}/mcp"
    with pytest.raises(HTTPSyncError, match="could not connect") as failed:
        _sync(HttpSyncMethod(make_config(akosha_url=url)))
    assert url in str(failed.value)


# ------------------------------------------------------------ interruptions
def test_akosha_killed_mid_sync_then_restarted(
    private_akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo
) -> None:
    sid = _sid()
    config = make_config(system_id=sid, akosha_url=private_akosha.url, http_batch_size=50)
    conversations = _source_ids(sample, "conversation")

    def kill_after_first_batch(phase: str, done: int, total: int) -> None:
        if phase == "send:conversation" and private_akosha.is_running():
            private_akosha.kill()

    with pytest.raises(HTTPSyncError) as failed:
        _sync(HttpSyncMethod(config), progress=kill_after_first_batch)
    assert private_akosha.url in str(failed.value)
    assert "50 memories were delivered" in str(failed.value)

    private_akosha.restart()
    result = _sync(HttpSyncMethod(config))
    assert result["success"], result["error"]
    # Only what was not acknowledged before the kill goes again.
    assert result["details"]["sent"]["conversation"] == len(conversations) - 50
    assert result["details"]["duplicates"] == {}
    assert result["details"]["failed"] == {}
    everything = _memory_ids(sid, "conversation", conversations)
    held = _held(private_akosha, everything)
    # Akosha 0.11 keeps memories in an in-memory DuckDB: the batch it acknowledged
    # before the kill did not survive its restart (nothing on our side can see that);
    # every other conversation arrived, each exactly once (no duplicates above).
    assert len(held) == len(everything) - 50


def test_resend_after_akosha_lost_its_data(
    private_akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo, tmp_path: Path
) -> None:
    sid = _sid()
    config = make_config(system_id=sid, akosha_url=private_akosha.url)
    expected = _memory_ids(sid, "conversation", _source_ids(sample, "conversation"))
    assert _sync(HttpSyncMethod(config))["success"]
    private_akosha.restart()  # Akosha 0.11 forgets everything it held
    quiet = _sync(HttpSyncMethod(config))
    assert quiet["details"]["sent"] == {}  # our progress cannot know

    toml = tmp_path / "resend.toml"
    toml.write_text(
        f'system_id = "{sid}"\nakosha_url = "{private_akosha.url}"\n'
        f'data_dir = "{config.data_dir}"\nstate_dir = "{config.state_dir}"\n'
        f'log_file = "{config.log_file}"\nforce_method = "http"\n'
    )
    exe = str(Path(sys.executable).with_name("akosha-sync"))
    done = subprocess.run([exe, "--config", str(toml), "sync", "--resend", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["details"]["sent"]["conversation"] == len(expected)
    assert _held(private_akosha, expected) == set(expected)


class _Relay:
    """A TCP relay in front of Akosha. ``swallow`` lets requests through but drops
    every answer once it is complete: Akosha does the work, the client never hears."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.swallow = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        held = b""
        with contextlib.suppress(OSError):  # either side closing ends the pump
            while data := src.recv(65536):
                if answers and self.swallow:
                    held += data
                    if b'"jsonrpc"' in held:  # the whole answer is in: Akosha is done
                        break
                    continue
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        for sock in self._sockets:
            sock.close()


def test_answer_lost_mid_sync_nothing_lost_duplicates_counted(
    akosha: AkoshaServer, make_config: MakeConfig, sample: SampleInfo
) -> None:
    sid = _sid()
    relay = _Relay(akosha.port)
    try:
        config = make_config(system_id=sid, akosha_url=relay.url, http_batch_size=50)

        def lose_answers_after_first_batch(phase: str, done: int, total: int) -> None:
            if phase == "send:conversation":
                relay.swallow = True

        with pytest.raises(HTTPSyncError, match="tried 2 times"):
            _sync(HttpSyncMethod(config), progress=lose_answers_after_first_batch)
        relay.swallow = False
        result = _sync(HttpSyncMethod(config))
    finally:
        relay.close()
    assert result["success"], result["error"]
    conversations = _source_ids(sample, "conversation")
    # Batch 2 reached Akosha but its answer did not reach us: sent again, refused
    # as duplicates, counted as delivered.
    assert result["details"]["sent"]["conversation"] == len(conversations) - 50
    assert result["details"]["duplicates"] == {"conversation": 50}
    assert result["details"]["failed"] == {}
    expected = [
        *_memory_ids(sid, "conversation", conversations),
        *_memory_ids(sid, "reflection", _source_ids(sample, "reflection")),
        *_memory_ids(sid, "entity", _source_ids(sample, "entity")),
    ]
    assert _held(akosha, expected) == set(expected)


def test_batch_refused_as_too_large_is_split_and_a_giant_record_reported(
    akosha: AkoshaServer,
    make_config: MakeConfig,
    sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sid = _sid()
    con = duckdb.connect(str(sample.reflection_path))
    try:
        # 20 memories of ~250 KB (5 MB together: one call would be refused with 413)
        # and one of 4.5 MB that no call can carry.
        con.execute(
            "INSERT INTO conversations_v2 SELECT * REPLACE (id || '-big' AS id, "
            "repeat('big memory. ', 21000) AS content) FROM conversations_v2 LIMIT 20"
        )
        con.execute(
            "INSERT INTO conversations_v2 SELECT * REPLACE ('giant' AS id, "
            "repeat('giant memory ', 360000) AS content) FROM conversations_v2 LIMIT 1"
        )
    finally:
        con.close()
    # Pretend our byte estimate is useless, so only Akosha's 413 bounds the calls.
    monkeypatch.setattr(http_module, "_MAX_BATCH_BYTES", 1 << 30)
    method = HttpSyncMethod(make_config(system_id=sid, akosha_url=akosha.url))
    result = _sync(method)
    assert result["details"]["stored"]["conversation"] == 205 + 20
    assert result["details"]["failed"] == {"conversation": 1}
    [failure] = result["details"]["failures"]
    assert failure["memory_id"] == memory_id(sid, "conversation", "giant")
    assert "4 MiB" in failure["error"]
    assert result["success"] is False
