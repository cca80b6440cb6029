"""The fault suite (issue 9): each fault against real components, checked independently.

SeaweedFS is real (the shared one, or a private one where the test kills it), Akosha is
real, the daemon is a real ``akosha-sync serve`` process, syncs from the command line
are real ``akosha-sync sync`` processes, and the faults are made by our own proxy
(tests/support/proxy.py) between us and the store. What landed in the bucket is read
back with the minio client: every manifest must restore (each object it names is
there and matches both SHA-256), whatever the fault. bench/faults.py runs the same
faults and prints the table for bench/README.md.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig, ConfigError, load_config
from akosha_sync.sample import create_sample_databases, grow_to_size
from akosha_sync.server.daemon import SyncDaemon
from akosha_sync.server.queue import JobQueue
from akosha_sync.sync.runner import run_sync
from support.faults import (
    EXE,
    DaemonProcess,
    claims_without_manifest,
    incomplete_uploads,
    objects,
    restore_problems,
    session_end,
    until,
    write_toml,
)
from support.process import pick_free_port
from support.proxy import FaultProxy, ProxyRequest
from support.s3_fixtures import PRIVATE_BUCKET
from support.seaweedfs import SeaweedFS
from support.verify import manifests

MakeConfig = Callable[..., AkoshaSyncConfig]
#: The budget of one sync: upload_timeout_seconds' lowest allowed value.
BUDGET_S = 30


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def proxy(seaweedfs: SeaweedFS) -> Iterator[FaultProxy]:
    """The fault proxy in front of the shared SeaweedFS."""
    with FaultProxy.to(seaweedfs.endpoint) as running:
        yield running


@pytest.fixture
def via_proxy(s3_config: MakeConfig, proxy: FaultProxy) -> MakeConfig:
    """``s3_config`` whose store is reached through ``proxy``."""

    def make(**overrides: Any) -> AkoshaSyncConfig:
        return s3_config(**{"cloud_endpoint": proxy.endpoint, **overrides})

    return make


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[AkoshaSyncConfig], DaemonProcess]]:
    """Start real daemons for a config; every one is killed at teardown."""
    started: list[DaemonProcess] = []

    def start(config: AkoshaSyncConfig) -> DaemonProcess:
        n = len(started)
        toml = write_toml(config, tmp_path / f"daemon-{n}.toml")
        daemon = DaemonProcess(toml, config.state_path, stderr=tmp_path / f"daemon-{n}.err")
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.kill()


def _cli_sync(config: AkoshaSyncConfig, toml: Path, *extra: str,
              timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """``akosha-sync sync --json``: exit code, result, stderr."""
    write_toml(config, toml)
    done = subprocess.run([EXE, "--config", str(toml), "sync", "--json", *extra],
                          capture_output=True, text=True, timeout=timeout, check=False)
    result = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, result, done.stderr


def _sync_now(config: AkoshaSyncConfig, **options: Any) -> dict[str, Any]:
    """One sync in this process: what the CLI runs, without its seconds of start-up."""
    return anyio.run(lambda: run_sync(config, trigger="test", **options))


@contextmanager
def _holding_sync_lock(config: AkoshaSyncConfig) -> Iterator[None]:
    """The seam of scenario 6: while held, the daemon's sync cannot start uploading."""
    config.state_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.state_path / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _queue_rows(config: AkoshaSyncConfig) -> list[tuple[int, str, int | None]]:
    """(id, status, history_id) of every request, read straight from the queue file."""
    con = sqlite3.connect(config.state_path / "queue.sqlite3", timeout=10)
    try:
        return [(r[0], r[1], r[2]) for r in
                con.execute("SELECT id, status, history_id FROM requests ORDER BY id")]
    finally:
        con.close()


def _is_part(request: ProxyRequest) -> bool:
    return request.method == "PUT" and "partNumber=" in request.query


def _is_pack(request: ProxyRequest) -> bool:
    return request.method == "PUT" and request.path.endswith(".pack")


def _upload_id(request: ProxyRequest) -> str | None:
    parts = request.path.split("/")
    return parts[parts.index("uploads") + 1] if "uploads" in parts[:-1] else None


# ------------------------------------------------------- 1. store killed mid-upload
@pytest.mark.parametrize("layout", ["files", "blocks"])
def test_store_killed_mid_upload(
    private_seaweedfs: SeaweedFS, make_config: MakeConfig, s3_credentials: Any,
    tmp_path: Path, layout: str,
) -> None:
    """A clear error, no manifest, no multipart upload left; the next sync succeeds.

    The files layout sends a large database as a multipart upload (killed between its
    parts); the blocks layout sends packs of ~8 MiB, one PUT each (killed during one)."""
    data = tmp_path / "big"
    grow_to_size(data, 12, 1, seed=11)  # ~9 MB stored: two 5 MiB parts
    client = private_seaweedfs.minio_client()
    with FaultProxy.to(private_seaweedfs.endpoint) as proxy:
        config = make_config(
            cloud_bucket=PRIVATE_BUCKET, cloud_endpoint=proxy.endpoint, data_dir=str(data),
            access_key_id=s3_credentials.access_key,
            secret_access_key=s3_credentials.secret_key,
            akosha_url="http://127.0.0.1:9/mcp", export_memories=False, chunk_size_mb=5,
            storage_layout=layout,
        )
        toml = write_toml(config, tmp_path / "c.toml")
        started = time.monotonic()
        sync = subprocess.Popen(
            [EXE, "--config", str(toml), "sync", "--json", "--method", "cloud"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            if layout == "files":
                proxy.wait_for(_is_part, timeout=60, what="a multipart part upload")
            else:
                proxy.wait_for(_is_pack, timeout=60, what="a pack upload")
            private_seaweedfs.kill()
            killed = time.monotonic()
            out, _err = sync.communicate(timeout=BUDGET_S + 30)
        finally:
            if sync.poll() is None:
                sync.kill()
        detected = time.monotonic() - killed
        result = json.loads(out)
        assert sync.returncode == 1 and result["success"] is False
        assert "cloud storage request failed" in result["error"] and "Target:" in result["error"]
        assert detected < BUDGET_S, f"took {detected:.1f}s to report the dead store"

        private_seaweedfs.start()
        assert manifests(client, PRIVATE_BUCKET) == [], "a manifest for the failed upload"
        code, again, stderr = _cli_sync(config, toml, "--method", "cloud")
        assert code == 0 and again["success"], stderr
        assert len(manifests(client, PRIVATE_BUCKET)) == 1
        assert restore_problems(client, PRIVATE_BUCKET) == []
        assert incomplete_uploads(client, PRIVATE_BUCKET) == [], (
            "the killed upload's multipart upload was never aborted"
        )
        assert time.monotonic() - started < 120


# ------------------------------------------------------------- 2. stalled link
@pytest.mark.slow  # the budget cannot be set below 30 s
def test_stalled_connection_fails_within_budget_and_daemon_answers(
    via_proxy: MakeConfig, proxy: FaultProxy, daemons: Callable[..., DaemonProcess],
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = via_proxy(upload_timeout_seconds=BUDGET_S, max_retries=1)
    daemon = daemons(config)
    # A database's bytes: a whole object (files layout) or a pack of its pieces (blocks).
    proxy.stall(lambda r: r.method == "PUT" and (".duckdb" in r.path or r.path.endswith(".pack")),
                after_bytes=32 * 1024)
    submitted = time.monotonic()
    assert daemon.hook().status_code == 202
    until(lambda: proxy.stalled, timeout=30, what="the upload to reach the stall")
    # Stalled mid-transfer: the daemon keeps answering, at once.
    for _ in range(2):
        began = time.monotonic()
        assert daemon.health()["running"] is True
        assert daemon.status()["running"] is not None
        assert time.monotonic() - began < 2
    last = until(lambda: (s := daemon.status())["last_result"] and s["last_result"],
                 timeout=BUDGET_S + 30, what="the stalled sync's result")
    took = time.monotonic() - submitted
    assert last["success"] is False
    assert "upload_timeout_seconds" in json.dumps(last)
    assert took <= BUDGET_S + 5, f"the sync took {took:.1f}s with a {BUDGET_S}s budget"
    proxy.resume()
    assert daemon.health()["status"] == "ok"
    assert manifests(minio_client, s3_bucket) == []


# ------------------------------------------------------ 3. lost manifest answer
def test_lost_manifest_answer_never_leaves_a_dangling_manifest(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    config = via_proxy(max_retries=2)
    proxy.drop_response(lambda r: r.method == "PUT" and r.path.endswith("/manifest.json"))
    result = _sync_now(config, method="cloud")
    assert any(e.dropped for e in proxy.exchanges), "the fault did not happen"
    found = manifests(minio_client, s3_bucket)
    assert restore_problems(minio_client, s3_bucket) == [], "a manifest points at nothing"
    if found:  # committed: the sync must say so
        assert result["success"], result["error"]
        assert result["manifest_key"] in found
    else:
        assert not result["success"]


def test_a_sigterm_mid_upload_ends_the_sync_like_ctrl_c_and_leaves_nothing(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """``timeout`` or a service manager stops a CLI sync with SIGTERM: its clean-up runs
    (before, the process vanished and left its claim, which holds prune up)."""
    config = via_proxy()
    toml = write_toml(config, tmp_path / "c.toml")
    proxy.stall(lambda r: r.method == "PUT" and r.path.endswith(".pack"), after_bytes=32 * 1024)
    proc = subprocess.Popen([EXE, "--config", str(toml), "sync", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: proxy.stalled, timeout=60, what="the upload to reach the stall")
        assert objects(minio_client, s3_bucket), "the claim is written before any pack"
        proc.send_signal(signal.SIGTERM)
        proxy.resume()  # the clean-up's requests go through the same proxy
        assert proc.wait(timeout=60) == 143  # 128 + SIGTERM, as shells report it
        assert proc.stderr is not None
        assert "interrupted; an upload is either whole" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert manifests(minio_client, s3_bucket) == []
    # The claim is removed. The stalled pack's PUT may still land after its DELETE once
    # the proxy relays it again: an unreferenced pack, which prune removes.
    left = objects(minio_client, s3_bucket)
    assert [k for k in left if "/uploads/" in k] == [], left
    assert all(k.endswith(".pack") for k in left), left


def _is_claim(request: ProxyRequest) -> bool:
    return request.method == "PUT" and request.path.endswith("/_claim.json")


def test_a_lost_answer_to_the_claim_leaves_no_second_claim_behind(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
) -> None:
    """The claim's PUT landed and its answer was lost: the retry finds the key taken by
    our own bytes and goes on with it. Before, it took a new upload id and left the
    first claim, which prune counts as an upload in flight for two hours."""
    config = via_proxy(max_retries=2)
    proxy.drop_response(_is_claim)
    result = _sync_now(config, method="cloud")
    assert any(e.dropped for e in proxy.exchanges), "the fault did not happen"
    assert result["success"], result["error"]
    assert claims_without_manifest(minio_client, s3_bucket) == []
    assert len(proxy.seen(_is_claim)) == 2, "one upload id: the claim and its retry"
    assert restore_problems(minio_client, s3_bucket) == []


@pytest.mark.parametrize("held", ["PUT", "HEAD"])
def test_a_sigterm_while_the_claim_is_answered_takes_the_claim_back(
    held: str, via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio,
    s3_bucket: str, tmp_path: Path,
) -> None:
    """Stopped while the answer to its claim's PUT (or to the HEAD that reads the
    claim's time back) is on the way, with the claim in the store: the sync deletes it,
    as it deletes what it stored. Before, the claim stayed, an upload in flight for
    prune, which then waited for it (up to 15 minutes a run, for two hours)."""
    config = via_proxy()
    toml = write_toml(config, tmp_path / "c.toml")
    proxy.hold_response(lambda r: r.method == held and r.path.endswith("/_claim.json"))
    proc = subprocess.Popen([EXE, "--config", str(toml), "sync", "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        until(lambda: proxy.stalled, timeout=60, what="the claim's answer to be held")
        assert claims_without_manifest(minio_client, s3_bucket), "the claim is stored"
        asked = len(proxy.exchanges)
        proc.send_signal(signal.SIGTERM)
        # The signal has been handled once the process exits or asks the store again.
        until(lambda: proc.poll() is not None or len(proxy.exchanges) > asked,
              timeout=30, what="the stopped sync to exit or to call the store")
        proxy.resume()
        assert proc.wait(timeout=60) == 143
        assert proc.stderr is not None
        assert "interrupted" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert objects(minio_client, s3_bucket) == []


# ------------------------------------- 4. wrong key, missing bucket, no endpoint
@pytest.mark.parametrize(
    ("fault", "setting"),
    [("wrong key", "secret_access_key"), ("missing bucket", "cloud_bucket"),
     ("unreachable endpoint", "cloud_endpoint")],
)
def test_cloud_misconfigured_names_the_setting_fast_and_falls_back(
    fault: str, setting: str, via_proxy: MakeConfig, proxy: FaultProxy, akosha: Any,
    tmp_path: Path,
) -> None:
    # A few records: the fallback's delivery to Akosha is not what is measured here.
    tiny = create_sample_databases(tmp_path / "tiny", conversations=5, reflections=2,
                                   entities=3, relations=2, wal_conversations=1,
                                   seed=int.from_bytes(os.urandom(3), "big"))
    overrides: dict[str, Any] = {"akosha_url": akosha.url, "data_dir": str(tiny.data_dir)}
    if fault == "wrong key":
        overrides["secret_access_key"] = "wrong-secret-" + "x" * 20
    elif fault == "missing bucket":
        overrides["cloud_bucket"] = "no-such-bucket-" + os.urandom(4).hex()
    else:
        proxy.refuse()
    # In process (the CLI start costs seconds on a busy machine); store and Akosha are real.
    result = _sync_now(via_proxy(**overrides))
    attempts = result.get("method_attempts") or []
    assert [a["method"] for a in attempts][:2] == ["cloud", "http"], result
    cloud = attempts[0]
    assert setting in cloud["error"], cloud["error"]
    assert cloud["duration_seconds"] < 2, f"{fault} took {cloud['duration_seconds']}s"
    assert result["method"] == "http" and result["fallback_from"] == ["cloud"]


# ------------------------------------------------------------ 5. both down
def test_both_targets_down_reports_both_and_stays_retriable(
    via_proxy: MakeConfig, proxy: FaultProxy, daemons: Callable[..., DaemonProcess],
    minio_client: Minio, s3_bucket: str,
) -> None:
    config = via_proxy(akosha_url=f"http://127.0.0.1:{pick_free_port()}/mcp")
    daemon = daemons(config)
    proxy.refuse()
    failed = daemon.call_tool("sync_to_akosha", {})
    assert failed["success"] is False
    assert "cloud" in failed["error"] and "cloud_endpoint" in failed["error"]
    assert "http" in failed["error"] and "Akosha" in failed["error"]
    assert {a["method"] for a in failed["method_attempts"]} == {"cloud", "http"}
    assert daemon.health()["status"] == "ok"
    # The store comes back: the same daemon serves the retry, and it commits.
    proxy.accept()
    retried = daemon.call_tool("sync_to_akosha", {})
    assert retried["success"] is True, retried
    assert manifests(minio_client, s3_bucket) and not restore_problems(minio_client, s3_bucket)


def test_a_session_end_whose_sync_fails_stays_queued_and_lands_when_the_store_is_back(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Nobody waits for a session end's answer: a failed sync must not be its end."""
    config = via_proxy(akosha_url=f"http://127.0.0.1:{pick_free_port()}/mcp", max_retries=0)
    proxy.refuse()  # the laptop is offline as the session ends
    daemon = SyncDaemon(config)
    daemon.queue.retry_delays = (0.5,)  # the clock seam: retry every half second

    async def poll(check: Callable[[], Any], what: str) -> Any:
        return await anyio.to_thread.run_sync(lambda: until(check, timeout=60, what=what))

    async def scenario() -> int:
        async with daemon.running():
            request_id = await daemon.submit_hook(session_end())
            assert request_id is not None
            await poll(lambda: [q for q in daemon.queue.pending() if q.get("failed_attempts")],
                       "the failed session end to wait for its retry")
            assert manifests(minio_client, s3_bucket) == []
            with anyio.fail_after(60):  # what the user sees meanwhile
                shown = (await anyio.run_process(
                    [EXE, "--config", str(write_toml(config, tmp_path / "c.toml")), "status"],
                    check=False)).stdout.decode()
            assert ("queued:           1 sync request(s) not yet served; 1 failed and retry "
                    "at") in shown and "`akosha-sync drain` runs them now" in shown
            assert "cloud_endpoint" in shown, shown
            proxy.accept()  # back online: the retry lands without a new trigger
            await poll(lambda: daemon.queue.state_of(request_id).status == "done",
                       "the retried session end to be served")
            return request_id

    request_id = anyio.run(scenario)
    state = JobQueue(config.state_path).state_of(request_id)
    assert state.result is not None and state.result["success"] is True, state.result
    history = JobQueue(config.state_path).history(50)
    assert history[0]["success"] and not history[-1]["success"]
    assert "cloud_endpoint" in str(history[-1]["error"])
    assert manifests(minio_client, s3_bucket) and not restore_problems(minio_client, s3_bucket)


# ------------------------------------------------- 6. daemon killed after the ack
def test_daemon_killed_after_ack_completes_every_acknowledged_request(
    s3_config: MakeConfig, daemons: Callable[..., DaemonProcess], minio_client: Minio,
    s3_bucket: str,
) -> None:
    config = s3_config()
    daemon = daemons(config)
    with _holding_sync_lock(config):
        acked = [daemon.hook(session_end(f"s-{i}")).json()["request_id"] for i in range(3)]
        daemon.kill()  # SIGKILL: acknowledged, not uploaded
    assert manifests(minio_client, s3_bucket) == []
    again = daemons(config)
    rows = until(lambda: (r := _queue_rows(config)) and all(s == "done" for _, s, _ in r) and r,
                 timeout=60, what="every acknowledged request to complete")
    assert [r[0] for r in rows] == acked  # acknowledged == completed, nothing more or less
    history = again.status()["history"]
    assert history and all(h["success"] for h in history)
    assert manifests(minio_client, s3_bucket) and not restore_problems(minio_client, s3_bucket)


# ----------------------------------------- 7. 50 session ends from three processes
def test_fifty_session_ends_from_three_processes(
    via_proxy: MakeConfig, proxy: FaultProxy, daemons: Callable[..., DaemonProcess],
    minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    config = via_proxy()
    daemon = daemons(config)
    toml = daemon.toml
    routes, commands, clis = 40, 8, 2
    proxy.delay(0.1)  # each sync then spans a second or so on the wire: overlaps would show
    answers: list[int] = []
    lock = threading.Lock()
    http = httpx.Client(base_url=daemon.url, timeout=30,
                        limits=httpx.Limits(max_connections=routes))
    go = threading.Event()

    def post(i: int) -> None:
        go.wait(10)
        status = http.post("/hooks/session-end", json=session_end(f"route-{i}")).status_code
        with lock:
            answers.append(status)

    posters = [threading.Thread(target=post, args=(i,)) for i in range(routes)]
    for thread in posters:
        thread.start()
    began = time.monotonic()
    go.set()  # the hook route, the hook command and the CLI, all at once
    hooks = [subprocess.Popen([EXE, "--config", str(toml), "hook", "session-end"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(commands)]
    for i, hook in enumerate(hooks):
        assert hook.stdin is not None
        hook.stdin.write(json.dumps(session_end(f"cmd-{i}")))
        hook.stdin.close()
    syncs = [subprocess.Popen([EXE, "--config", str(toml), "sync", "--json", "--method",
                               "cloud"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(clis)]
    issued = time.monotonic() - began
    for thread in posters:
        thread.join(60)
    http.close()
    assert issued < 1.0, f"issuing took {issued:.2f}s"
    assert answers == [202] * routes
    for hook in hooks:
        assert hook.wait(60) == 0
        assert hook.stderr is not None and hook.stderr.read() == ""
    for sync in syncs:  # the CLI waiters get a result
        out, err = sync.communicate(timeout=120)
        assert json.loads(out)["success"] is True, err

    seen: list[Any] = []

    def served() -> list[tuple[int, str, int | None]] | None:
        rows = _queue_rows(config)
        seen[:] = [sorted(Counter(s for _, s, _ in rows).items())]
        done = len(rows) == routes + commands and all(s == "done" for _, s, _ in rows)
        return rows if done else None

    try:
        rows = until(served, timeout=120, what="every session end to be served")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; requests by status: {seen}; daemon alive: "
                             f"{daemon.alive()}; {daemon.stderr()[-1500:]}") from None
    assert all(h is not None for _, _, h in rows)  # each one has a recorded result
    # On the wire, one upload's writes end before the next upload's begin (reads may
    # touch an older upload's objects, which a later upload reuses).
    spans: dict[str, list[float]] = {}
    for exchange in proxy.exchanges:
        upload = _upload_id(exchange.request)
        if upload and exchange.request.method in ("PUT", "POST", "DELETE"):
            span = spans.setdefault(upload, [exchange.started, exchange.started])
            span[1] = max(span[1], exchange.finished or exchange.started)
    ordered = sorted(spans.values())
    assert len(ordered) >= 2
    for first, second in itertools.pairwise(ordered):
        assert first[1] <= second[0], "two uploads overlapped"
    assert restore_problems(minio_client, s3_bucket) == []


# ---------------------------------------------------------- 8. corrupt state
@pytest.mark.parametrize("broken", ["state files", "queue database"])
def test_corrupt_state_is_recovered_with_a_warning(
    broken: str, s3_config: MakeConfig, daemons: Callable[..., DaemonProcess],
    minio_client: Minio, s3_bucket: str, tmp_path: Path,
) -> None:
    config = s3_config()
    first = _sync_now(config, method="cloud")
    assert first["success"], first["error"]
    state = config.state_path
    named: list[str] = []
    if broken == "state files":
        (target,) = (state / "targets").glob("*.json")
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated
        delivered = state / "delivered.duckdb"
        delivered.write_bytes(delivered.read_bytes()[:1000])  # truncated
        (state / "daemon.json").write_text("{not json")
        named += [target.name, delivered.name]
    else:
        (state / "queue.sqlite3").write_bytes(b"this is not a SQLite database\n" * 100)
        named.append("queue.sqlite3")

    daemon = daemons(config)
    assert daemon.hook().status_code == 202
    last = until(lambda: (s := daemon.status())["last_result"] and s["last_result"],
                 timeout=60, what="the sync after recovery")
    assert last["success"] is True, last.get("error")
    assert len(manifests(minio_client, s3_bucket)) == 2
    assert restore_problems(minio_client, s3_bucket) == []
    warnings = [line for line in config.log_path.read_text().splitlines()
                if '"warning"' in line or '"error"' in line]
    for name in named:
        assert any(name in line for line in warnings), f"no warning names {name}"


# --------------------------------------------------------------- 9. bad input
def test_bad_hook_bodies_get_a_clear_error_and_write_nothing(
    via_proxy: MakeConfig, proxy: FaultProxy, daemons: Callable[..., DaemonProcess],
    minio_client: Minio, s3_bucket: str,
) -> None:
    daemon = daemons(via_proxy())
    proxy.reset_counts()
    url = f"{daemon.url}/hooks/session-end"
    json_header = {"Content-Type": "application/json"}
    cases: list[tuple[str, bytes, int, str]] = [
        ("oversized", json.dumps({**session_end(), "pad": "x" * 200_000}).encode(), 413,
         "too large"),
        ("not JSON", b"{oops", 400, "not JSON"),
        ("a list", b"[1, 2]", 400, "JSON object"),
        ("session_id a number", json.dumps({**session_end(), "session_id": 5}).encode(), 400,
         "session_id"),
        ("wrong event", json.dumps({**session_end(), "hook_event_name": 3}).encode(), 400,
         "hook_event_name"),
    ]
    for what, body, status, words in cases:
        answer = httpx.post(url, content=body, headers=json_header, timeout=5)
        assert answer.status_code == status, what
        assert words in answer.json()["error"], (what, answer.json())
    assert daemon.health()["queued"] == 0 and daemon.status()["history"] == []
    assert proxy.writes() == 0 and objects(minio_client, s3_bucket) == []


_INVALID_SETTINGS: list[tuple[str, Any]] = [
    ("upload_timeout_seconds", 5), ("max_retries", 99), ("retry_backoff_seconds", 0.0),
    ("chunk_size_mb", 0), ("http_batch_size", 0), ("daemon_port", 70000),
    ("force_method", "ftp"), ("system_id", "../../etc"), ("system_id", "a/b"),
    ("cloud_region", " "), ("cloud_endpoint", "ftp://example.com"),
    ("cloud_endpoint", "http://example.com"), ("cloud_bucket", "Bad_Bucket"),
    ("access_key_id", ""), ("akosha_url", "not a url"), ("reflection_db", "../x.duckdb"),
    ("knowledge_graph_db", "a/b.duckdb"),
]


def test_every_invalid_setting_is_named_and_writes_nothing(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    for name, value in _INVALID_SETTINGS:
        config = via_proxy(**{name: value})
        problems = config.validate()
        assert any(name in p for p in problems), (name, value, problems)
        result = _sync_now(config)
        assert result["success"] is False and name in result["error"], (name, result)
    # A value of the wrong type in the file is refused when the file is read.
    toml = tmp_path / "bad.toml"
    toml.write_text('max_retries = "three"\n')
    with pytest.raises(ConfigError, match="max_retries"):
        load_config(str(toml))
    done = subprocess.run([EXE, "--config", str(toml), "sync"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "max_retries" in done.stderr
    assert proxy.writes() == 0 and objects(minio_client, s3_bucket) == []


def test_a_database_that_is_not_duckdb_is_refused_and_nothing_is_written(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    data = tmp_path / "not-duckdb"
    data.mkdir()
    (data / "reflection.duckdb").write_bytes(b"SQLite format 3\x00" + b"\x00" * 4000)
    (data / "knowledge_graph.duckdb").write_text("just some text\n")
    result = _sync_now(via_proxy(data_dir=str(data)), method="cloud")
    assert result["success"] is False
    assert "is not a readable DuckDB database" in result["error"]
    assert "reflection.duckdb" in result["error"] and "knowledge_graph.duckdb" in result["error"]
    assert objects(minio_client, s3_bucket) == [], "something was left in the bucket"
    assert manifests(minio_client, s3_bucket) == []


def _a_session_end_failed_with_the_store_down(
    via_proxy: MakeConfig, proxy: FaultProxy, tmp_path: Path
) -> tuple[AkoshaSyncConfig, Path, int]:
    """A queued session end whose drain failed (the store refused): it waits for its
    retry. The store accepts again on return. (config, its TOML, the request id)"""
    config = via_proxy(akosha_url=f"http://127.0.0.1:{pick_free_port()}/mcp", max_retries=0)
    toml = write_toml(config, tmp_path / "c.toml")
    request_id = JobQueue(config.state_path).enqueue("session-end")
    proxy.refuse()
    first = subprocess.run([EXE, "--config", str(toml), "drain"], capture_output=True,
                           text=True, timeout=120, check=False)
    assert first.returncode == 1, first.stderr  # the sync failed: the request waits
    waiting = JobQueue(config.state_path).pending()
    assert [q["id"] for q in waiting] == [request_id] and waiting[0]["failed_attempts"] == 1
    proxy.accept()
    return config, toml, request_id


def test_drain_runs_a_failed_session_end_now_instead_of_waiting_for_its_retry(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """`akosha-sync drain` is someone asking to run the queue: it ran nothing, silently,
    while a failed session end waited 30 s (then minutes) for its retry."""
    config, toml, request_id = _a_session_end_failed_with_the_store_down(
        via_proxy, proxy, tmp_path)
    second = subprocess.run([EXE, "--config", str(toml), "drain"], capture_output=True,
                            text=True, timeout=120, check=False)
    assert second.returncode == 0, second.stderr
    assert JobQueue(config.state_path).state_of(request_id).status == "done"
    assert manifests(minio_client, s3_bucket) and not restore_problems(minio_client, s3_bucket)


def test_a_sync_by_hand_serves_the_session_end_that_failed_while_the_store_was_down(
    via_proxy: MakeConfig, proxy: FaultProxy, minio_client: Minio, s3_bucket: str,
    tmp_path: Path,
) -> None:
    """It showed as failed in status, and synced again at its retry time, after the
    user had synced by hand."""
    config, toml, request_id = _a_session_end_failed_with_the_store_down(
        via_proxy, proxy, tmp_path)
    by_hand = subprocess.run([EXE, "--config", str(toml), "sync"], capture_output=True,
                             text=True, timeout=120, check=False)
    assert by_hand.returncode == 0, by_hand.stderr
    assert "1 waiting session end(s) served by this sync" in by_hand.stdout
    queue = JobQueue(config.state_path)
    assert queue.state_of(request_id).status == "done" and queue.pending() == []
    served = queue.result_of(request_id)
    assert served is not None and served["success"]
    (manifest,) = manifests(minio_client, s3_bucket)
    assert served["upload_id"] in manifest and not restore_problems(minio_client, s3_bucket)
    status = subprocess.run([EXE, "--config", str(toml), "status"], capture_output=True,
                            text=True, timeout=60, check=True)
    assert "not yet served" not in status.stdout
