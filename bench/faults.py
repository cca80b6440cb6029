"""The fault suite with figures (issue 9): each fault against real components, one table.

    python bench/faults.py [--size-mb 100] [--write-readme] [--only 1,3]

Everything is real: SeaweedFS (``weed mini``) on free loopback ports, Akosha 0.11 in
its own venv (``$AKOSHA_VENV``), the daemon as an ``akosha-sync serve --transport
http`` process, syncs as ``akosha-sync sync`` processes, and our own fault proxy
(tests/support/proxy.py) between us and the store. What landed in the bucket is
read back with minio: a manifest that does not restore (an object it names is
missing or does not match its SHA-256) counts as data lost, and so does an
acknowledged session end that never completed.

Prints one table (fault | expected | what happened | data lost | time to detect);
``--write-readme`` also replaces the fault-suite section at the end of
bench/README.md. tests/test_faults.py runs the same faults, smaller, in ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import structlog
from minio import Minio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from akosha_sync.config import AkoshaSyncConfig, ConfigError, load_config  # noqa: E402
from akosha_sync.sample import create_sample_databases, grow_to_size  # noqa: E402
from akosha_sync.sync.runner import run_sync  # noqa: E402
from support.akosha import AkoshaServer  # noqa: E402
from support.faults import (  # noqa: E402
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
from support.process import pick_free_port  # noqa: E402
from support.proxy import FaultProxy, ProxyRequest  # noqa: E402
from support.seaweedfs import SeaweedFS  # noqa: E402
from support.verify import manifests  # noqa: E402

BUDGET_S = 30  # upload_timeout_seconds: the lowest value allowed
README = ROOT / "bench" / "README.md"
BEGIN, END = "<!-- fault-suite:begin -->", "<!-- fault-suite:end -->"


@dataclass
class Row:
    fault: str
    expected: str
    happened: list[str] = field(default_factory=list)  # empty: as expected
    notes: list[str] = field(default_factory=list)
    lost: int = 0
    detect_s: float | None = None

    def check(self, ok: object, failure: str) -> None:
        if not ok:
            self.happened.append(failure)

    def cell(self) -> str:
        verdict = "as expected" if not self.happened else "NOT AS EXPECTED: " + "; ".join(
            self.happened)
        return "; ".join([verdict, *self.notes])


class Bench:
    """Shared servers and a fresh bucket + state folder per scenario."""

    def __init__(self, root: Path, size_mb: int) -> None:
        self.root = root
        self.size_mb = size_mb
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.s3 = SeaweedFS(root / "weed", self.access_key, self.secret_key, buckets=[])
        self.akosha = AkoshaServer(root / "akosha")
        self.minio: Minio | None = None  # set in start()
        self.sample = root / "sample"
        self._n = 0

    def start(self) -> None:
        self.s3.start()
        self.akosha.start()
        self.minio = self.s3.minio_client()
        create_sample_databases(self.sample, seed=int.from_bytes(os.urandom(3), "big"))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.akosha.close()
        with contextlib.suppress(Exception):
            self.s3.close()

    def folder(self) -> Path:
        self._n += 1
        path = self.root / f"run-{self._n}"
        path.mkdir()
        return path

    def config(self, where: Path, *, endpoint: str | None = None, bucket: str | None = None,
               **overrides: Any) -> AkoshaSyncConfig:
        if bucket is None:
            bucket = self.s3.make_bucket(f"fault-{secrets.token_hex(4)}")
        values: dict[str, Any] = {
            "cloud_bucket": bucket,
            "cloud_endpoint": endpoint or self.s3.endpoint,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "system_id": "bench-host",
            "data_dir": str(self.sample),
            "state_dir": str(where / "state"),
            "log_file": str(where / "state" / "akosha-sync.log"),
            "akosha_url": f"http://127.0.0.1:{pick_free_port()}/mcp",
            "max_retries": 1,
            "retry_backoff_seconds": 0.1,
            "upload_timeout_seconds": BUDGET_S,
        }
        values.update(overrides)
        return AkoshaSyncConfig(**values)

    def daemon(self, config: AkoshaSyncConfig, where: Path, n: int = 0) -> DaemonProcess:
        toml = write_toml(config, where / f"daemon-{n}.toml")
        return DaemonProcess(toml, config.state_path, stderr=where / f"daemon-{n}.err").start()


def _cli_sync(config: AkoshaSyncConfig, where: Path, *extra: str
              ) -> tuple[int, dict[str, Any], str]:
    toml = write_toml(config, where / "cli.toml")
    done = subprocess.run([EXE, "--config", str(toml), "sync", "--json", *extra],
                          capture_output=True, text=True, timeout=600, check=False)
    result = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {}
    return done.returncode, result, done.stderr


def _queue_rows(config: AkoshaSyncConfig) -> list[tuple[int, str]]:
    con = sqlite3.connect(config.state_path / "queue.sqlite3", timeout=10)
    try:
        return [(r[0], r[1]) for r in con.execute("SELECT id, status FROM requests")]
    finally:
        con.close()


@contextlib.contextmanager
def _holding_sync_lock(config: AkoshaSyncConfig) -> Iterator[None]:
    config.state_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.state_path / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _bucket_lost(b: Bench, bucket: str) -> int:
    assert b.minio is not None
    return len(restore_problems(b.minio, bucket))


def _is_part(request: ProxyRequest) -> bool:
    return request.method == "PUT" and "partNumber=" in request.query


# ------------------------------------------------------------------ scenarios
def _is_pack(request: ProxyRequest) -> bool:
    return request.method == "PUT" and request.path.endswith(".pack")


def s1_store_killed(b: Bench) -> list[Row]:
    # files: a database is a multipart upload (killed between parts); blocks (the
    # default): packs of ~8 MiB, one PUT each (killed during one).
    return [_store_killed(b, "files"), _store_killed(b, "blocks")]


def _store_killed(b: Bench, layout: str) -> Row:
    row = Row(f"1. S3 server killed mid-upload ({b.size_mb} MB, {layout} layout)",
              "clear error; no manifest; multipart aborted; next sync after restart succeeds; "
              "every manifest restores")
    where = b.folder()
    data = where / "data"
    grow_to_size(data, b.size_mb, 2, seed=int.from_bytes(os.urandom(3), "big"))
    server = SeaweedFS(where / "weed", b.access_key, b.secret_key, buckets=["private"])
    with server, FaultProxy.to(server.endpoint) as proxy:
        client = server.minio_client()
        config = b.config(where, endpoint=proxy.endpoint, bucket="private", data_dir=str(data),
                          export_memories=False, storage_layout=layout)
        toml = write_toml(config, where / "cli.toml")
        sync = subprocess.Popen([EXE, "--config", str(toml), "sync", "--json", "--method",
                                 "cloud"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        proxy.wait_for(_is_part if layout == "files" else _is_pack, timeout=120,
                       what="a part upload" if layout == "files" else "a pack upload")
        server.kill()
        killed = time.monotonic()
        out, _ = sync.communicate(timeout=BUDGET_S + 60)
        row.detect_s = time.monotonic() - killed
        result = json.loads(out) if out.strip() else {}
        row.check(sync.returncode == 1 and not result.get("success"), "the sync did not fail")
        row.check("cloud storage request failed" in str(result.get("error")),
                  "the error is unclear")
        server.start()
        row.check(manifests(client, "private") == [], "a manifest for the failed upload")
        # Nothing can abort on a dead store: what it left is aborted by the next sync.
        left = incomplete_uploads(client, "private")
        row.notes.append(f"{len(left)} multipart upload(s) left while the store was down")
        code, again, _ = _cli_sync(config, where, "--method", "cloud")
        row.check(code == 0 and again.get("success"), "the next sync failed")
        left = incomplete_uploads(client, "private")
        row.check(not left, f"{len(left)} multipart upload(s) still left after the next sync")
        row.lost = len(restore_problems(client, "private"))
        row.notes.append(f"error: {str(result.get('error'))[:90]}...")
    return row


def s2_stall(b: Bench) -> Row:
    row = Row("2. connection stalls mid-transfer",
              f"sync fails within its budget ({BUDGET_S} s); daemon keeps answering")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint)
        daemon = b.daemon(config, where)
        try:
            proxy.stall(lambda r: r.method == "PUT" and (
                ".duckdb" in r.path or r.path.endswith(".pack")), after_bytes=32768)
            submitted = time.monotonic()
            daemon.hook()
            until(lambda: proxy.stalled, timeout=60, what="the stall")
            began = time.monotonic()
            daemon.health()
            daemon.status()
            answer_s = time.monotonic() - began
            row.check(answer_s < 2, f"/health + a tool call took {answer_s:.1f}s during the stall")
            last = until(lambda: (s := daemon.status())["last_result"] and s["last_result"],
                         timeout=BUDGET_S * 4, what="the result")
            took = time.monotonic() - submitted
            row.detect_s = took
            row.check(not last["success"], "the stalled sync succeeded?")
            row.check(took <= BUDGET_S + 5, f"took {took:.1f}s for a {BUDGET_S}s budget")
            proxy.resume()
            row.check(daemon.health()["status"] == "ok", "the daemon stopped answering")
            row.notes.append(f"/health + status call during the stall: {answer_s:.2f}s")
            row.lost = _bucket_lost(b, config.cloud_bucket)
        finally:
            proxy.resume()
            daemon.kill()
    return row


def s3_lost_manifest_answer(b: Bench) -> Row:
    row = Row("3. manifest PUT's answer lost",
              "upload complete and valid, or absent; never a manifest naming missing objects")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint, max_retries=2)
        proxy.drop_response(lambda r: r.method == "PUT" and r.path.endswith("/manifest.json"))
        began = time.monotonic()
        code, result, _ = _cli_sync(config, where, "--method", "cloud")
        row.detect_s = time.monotonic() - began
        assert b.minio is not None
        found = manifests(b.minio, config.cloud_bucket)
        row.lost = _bucket_lost(b, config.cloud_bucket)
        row.check(row.lost == 0, f"the manifest names {row.lost} missing object(s)")
        row.check(bool(found) == bool(code == 0 and result.get("success")),
                  f"sync said success={result.get('success')} with {len(found)} manifest(s)")
        row.notes.append(f"outcome: {'committed' if found else 'absent'}")
    return row


def s10_claim(b: Bench) -> list[Row]:
    """The claim that reserves an upload id: its answer lost, or the sync stopped
    (SIGTERM) while the answer is on the way. A claim left behind is an upload in
    flight for prune, which then waits for it."""
    assert b.minio is not None
    lost = Row("10. claim PUT's answer lost",
               "the sync goes on with its claim; no claim left without a manifest")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint, max_retries=2)
        proxy.drop_response(lambda r: r.method == "PUT" and r.path.endswith("/_claim.json"))
        began = time.monotonic()
        code, result, _ = _cli_sync(config, where, "--method", "cloud")
        lost.detect_s = time.monotonic() - began
        left = claims_without_manifest(b.minio, config.cloud_bucket)
        lost.lost = _bucket_lost(b, config.cloud_bucket)
        lost.check(code == 0 and result.get("success"), f"sync failed: {result.get('error')}")
        lost.check(not left, f"claims left: {left}")
    stopped = Row("10. SIGTERM while the claim's answer is on the way",
                  "exit 143; nothing left in the bucket")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint)
        toml = write_toml(config, where / "cli.toml")
        proxy.hold_response(lambda r: r.method == "PUT" and r.path.endswith("/_claim.json"))
        proc = subprocess.Popen([EXE, "--config", str(toml), "sync", "--json"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            until(lambda: proxy.stalled, timeout=60, what="the claim's answer to be held")
            asked = len(proxy.exchanges)
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            until(lambda: proc.poll() is not None or len(proxy.exchanges) > asked,
                  timeout=30, what="the stopped sync to exit or to call the store")
            proxy.resume()
            code = proc.wait(timeout=60)
            stopped.detect_s = time.monotonic() - began
        finally:
            proc.kill()
            proc.wait()
        left = objects(b.minio, config.cloud_bucket)
        stopped.check(code == 143, f"exit {code}")
        stopped.check(not left, f"left in the bucket: {left}")
    return [lost, stopped]


def s4_misconfigured(b: Bench) -> list[Row]:
    rows = []
    for fault, setting in (("wrong key", "secret_access_key"),
                           ("missing bucket", "cloud_bucket"),
                           ("unreachable endpoint", "cloud_endpoint")):
        row = Row(f"4. {fault}", f"error names {setting} within 2 s; fallback starts")
        where = b.folder()
        with FaultProxy.to(b.s3.endpoint) as proxy:
            overrides: dict[str, Any] = {"akosha_url": b.akosha.url}
            if fault == "wrong key":
                overrides["secret_access_key"] = "wrong-" + secrets.token_urlsafe(20)
            elif fault == "missing bucket":
                overrides["cloud_bucket"] = f"missing-{secrets.token_hex(4)}"
            else:
                proxy.refuse()
            config = b.config(where, endpoint=proxy.endpoint, **overrides)
            _code, result, _ = _cli_sync(config, where)
            attempts = result.get("method_attempts") or []
            methods = [a["method"] for a in attempts]
            row.check(methods[:2] == ["cloud", "http"], f"methods tried: {methods}")
            if attempts:
                row.detect_s = attempts[0].get("duration_seconds")
                row.check(setting in attempts[0]["error"], f"{setting} not named")
                row.check((row.detect_s or 99) < 2, "slower than 2 s")
            row.check(result.get("success"), "the fallback did not deliver")
        rows.append(row)
    return rows


def s5_both_down(b: Bench) -> Row:
    row = Row("5. both targets down", "both reasons reported; the request stays retriable")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint)
        daemon = b.daemon(config, where)
        try:
            proxy.refuse()
            began = time.monotonic()
            failed = daemon.call_tool("sync_to_akosha", {})
            row.detect_s = time.monotonic() - began
            error = str(failed.get("error"))
            row.check(not failed["success"], "succeeded with both down?")
            row.check("cloud_endpoint" in error and "Akosha" in error, "a reason is missing")
            proxy.accept()
            retried = daemon.call_tool("sync_to_akosha", {})
            row.check(retried["success"], "the retry after recovery failed")
            row.lost = _bucket_lost(b, config.cloud_bucket)
        finally:
            daemon.kill()
    return row


def s6_sigkill_after_ack(b: Bench) -> Row:
    row = Row("6. daemon SIGKILLed after acknowledging session ends",
              "after a restart the sync runs; acknowledged requests == completed")
    where = b.folder()
    config = b.config(where)
    daemon = b.daemon(config, where)
    with _holding_sync_lock(config):
        acked = [daemon.hook(session_end(f"s-{i}")).json()["request_id"] for i in range(5)]
        daemon.kill()
    began = time.monotonic()
    again = b.daemon(config, where, 1)
    try:
        rows = until(lambda: (r := _queue_rows(config)) and all(s == "done" for _, s in r) and r,
                     timeout=120, what="completion")
        row.detect_s = time.monotonic() - began
        done = sorted(i for i, _ in rows)
        row.check(done == acked, f"acknowledged {acked}, completed {done}")
        row.lost = len(set(acked) - set(done)) + _bucket_lost(b, config.cloud_bucket)
        row.notes.append(f"{len(acked)} acknowledged, {len(done)} completed after restart")
    finally:
        again.kill()
    return row


def s7_fifty(b: Bench) -> Row:
    row = Row("7. 50 session ends in a second from 3 processes",
              "all acknowledged; syncs never overlap; every waiter gets a result")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint)
        daemon = b.daemon(config, where)
        try:
            routes, commands, clis = 40, 8, 2
            proxy.delay(0.1)  # syncs span about a second on the wire: overlaps would show
            http = httpx.Client(base_url=daemon.url, timeout=30,
                                limits=httpx.Limits(max_connections=routes))
            answers: list[int] = []
            go = threading.Event()

            def post(i: int) -> None:
                go.wait(10)
                answers.append(http.post("/hooks/session-end",
                                         json=session_end(f"r-{i}")).status_code)

            threads = [threading.Thread(target=post, args=(i,)) for i in range(routes)]
            for t in threads:
                t.start()
            began = time.monotonic()
            go.set()
            hooks = [subprocess.Popen([EXE, "--config", str(daemon.toml), "hook", "session-end"],
                                      stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, text=True)
                     for _ in range(commands)]
            for i, hook in enumerate(hooks):
                assert hook.stdin is not None
                hook.stdin.write(json.dumps(session_end(f"c-{i}")))
                hook.stdin.close()
            syncs = [subprocess.Popen([EXE, "--config", str(daemon.toml), "sync", "--json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True) for _ in range(clis)]
            issued = time.monotonic() - began
            for t in threads:
                t.join(60)
            http.close()
            row.check(answers == [202] * routes, f"route answers: {sorted(set(answers))}")
            row.check(all(h.wait(60) == 0 for h in hooks), "a hook command failed")
            results = [json.loads(s.communicate(timeout=300)[0] or "{}") for s in syncs]
            row.check(all(r.get("success") for r in results), "a CLI sync got no good result")
            rows = until(lambda: (r := _queue_rows(config)) and len(r) == routes + commands
                         and all(s == "done" for _, s in r) and r, timeout=300,
                         what="every request served")
            row.detect_s = time.monotonic() - began
            spans: dict[str, list[float]] = {}
            for e in proxy.exchanges:
                parts = e.request.path.split("/")
                if "uploads" in parts[:-1] and e.request.method in ("PUT", "POST", "DELETE"):
                    span = spans.setdefault(parts[parts.index("uploads") + 1],
                                            [e.started, e.started])
                    span[1] = max(span[1], e.finished or e.started)
            ordered = sorted(spans.values())
            overlaps = sum(a[1] > c[0] for a, c in itertools.pairwise(ordered))
            row.check(overlaps == 0, f"{overlaps} overlapping uploads on the wire")
            row.lost = (routes + commands - len(rows)) + _bucket_lost(b, config.cloud_bucket)
            row.notes.append(f"issued in {issued:.2f}s; {len(ordered)} uploads for "
                             f"{routes + commands + clis} triggers")
        finally:
            daemon.kill()
    return row


def s8_corrupt_state(b: Bench) -> list[Row]:
    rows = []
    for broken in ("state files", "queue database"):
        row = Row(f"8. corrupt {broken}", "recovered with a warning; the next sync succeeds")
        where = b.folder()
        config = b.config(where)
        _cli_sync(config, where, "--method", "cloud")
        state = config.state_path
        named = []
        if broken == "state files":
            for path in [*(state / "targets").glob("*.json"), state / "delivered.duckdb"]:
                path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 4)])
                named.append(path.name)
        else:
            (state / "queue.sqlite3").write_bytes(b"not a database\n" * 100)
            named.append("queue.sqlite3")
        began = time.monotonic()
        daemon: DaemonProcess | None = None
        try:
            daemon = b.daemon(config, where)
            daemon.hook()
            last = until(lambda d=daemon: d.alive() and (s := d.status())["last_result"]
                         and s["last_result"], timeout=120, what="a result")
            row.detect_s = time.monotonic() - began
            row.check(last["success"], f"the sync failed: {str(last.get('error'))[:80]}")
            log = config.log_path.read_text()
            warned = [n for n in named if any(n in line and ('"warning"' in line or
                                                             '"error"' in line)
                                              for line in log.splitlines())]
            row.check(warned == named, f"no warning names {sorted(set(named) - set(warned))}")
        except Exception as exc:  # a daemon that dies at start is the finding
            row.check(False, f"the daemon did not survive: {str(exc).splitlines()[-1][:100]}")
        finally:
            if daemon is not None:
                daemon.kill()
        row.lost = _bucket_lost(b, config.cloud_bucket)
        rows.append(row)
    return rows


def s9_bad_input(b: Bench) -> Row:
    row = Row("9. bad input (hook bodies, every invalid setting, system id with '/', "
              "not-DuckDB)", "a clear error each; nothing written to the bucket")
    where = b.folder()
    with FaultProxy.to(b.s3.endpoint) as proxy:
        config = b.config(where, endpoint=proxy.endpoint)
        daemon = b.daemon(config, where)
        slowest = 0.0
        try:
            proxy.reset_counts()
            bodies = [json.dumps({**session_end(), "pad": "x" * 200_000}).encode(), b"{oops",
                      b"[1]", json.dumps({**session_end(), "session_id": 5}).encode()]
            for body in bodies:
                began = time.monotonic()
                answer = httpx.post(f"{daemon.url}/hooks/session-end", content=body,
                                    headers={"Content-Type": "application/json"}, timeout=5)
                slowest = max(slowest, time.monotonic() - began)
                row.check(answer.status_code in (400, 413) and answer.json().get("error"),
                          f"hook body answered {answer.status_code}")
        finally:
            daemon.kill()
        invalid = [("upload_timeout_seconds", 5), ("max_retries", 99),
                   ("retry_backoff_seconds", 0.0), ("chunk_size_mb", 0), ("http_batch_size", 0),
                   ("daemon_port", 70000), ("force_method", "ftp"), ("system_id", "../../etc"),
                   ("cloud_region", " "), ("cloud_endpoint", "ftp://example.com"),
                   ("cloud_endpoint", "http://example.com"), ("cloud_bucket", "Bad_Bucket"),
                   ("access_key_id", ""), ("akosha_url", "not a url"),
                   ("reflection_db", "../x.duckdb"), ("knowledge_graph_db", "a/b.duckdb")]
        for name, value in invalid:
            bad = msgspec_replace(config, name, value)
            began = time.monotonic()
            result = anyio.run(lambda c=bad: run_sync(c, trigger="bench"))
            slowest = max(slowest, time.monotonic() - began)
            row.check(not result["success"] and name in str(result["error"]),
                      f"{name}={value!r} not named")
        toml = where / "typed.toml"
        toml.write_text('max_retries = "three"\n')
        try:
            load_config(str(toml))
            row.check(False, "a string max_retries was accepted")
        except ConfigError as exc:
            row.check("max_retries" in str(exc), "the type error does not name max_retries")
        junk = where / "junk"
        junk.mkdir()
        (junk / "reflection.duckdb").write_bytes(b"SQLite format 3\x00" + bytes(4000))
        (junk / "knowledge_graph.duckdb").write_text("text\n")
        began = time.monotonic()
        _code, result, _ = _cli_sync(msgspec_replace(config, "data_dir", str(junk)), where,
                                     "--method", "cloud")
        row.check("not a readable DuckDB database" in str(result.get("error")),
                  "the not-DuckDB error is unclear")
        assert b.minio is not None
        left = objects(b.minio, config.cloud_bucket)
        row.check(not left, f"{len(left)} object(s) left in the bucket")
        row.detect_s = slowest
        row.notes.append(f"{len(bodies)} hook bodies, {len(invalid) + 1} settings, 1 file; "
                         f"{proxy.writes()} write requests reached the store")
    return row


def msgspec_replace(config: AkoshaSyncConfig, name: str, value: Any) -> AkoshaSyncConfig:
    import msgspec

    return msgspec.structs.replace(config, **{name: value})


SCENARIOS: dict[int, Callable[[Bench], Row | list[Row]]] = {
    1: s1_store_killed, 2: s2_stall, 3: s3_lost_manifest_answer, 4: s4_misconfigured,
    5: s5_both_down, 6: s6_sigkill_after_ack, 7: s7_fifty, 8: s8_corrupt_state,
    9: s9_bad_input, 10: s10_claim,
}


def _table(rows: list[Row]) -> str:
    lines = ["| fault | expected | what happened | data lost | time to detect |",
             "|---|---|---|---|---|"]
    for r in rows:
        detect = "-" if r.detect_s is None else f"{r.detect_s:.2f} s"
        cell = r.cell().replace("|", "\\|")
        lines.append(f"| {r.fault} | {r.expected} | {cell} | {r.lost} | {detect} |")
    return "\n".join(lines)


def _write_readme(table: str, header: str) -> None:
    text = README.read_text()
    section = (
        f"{BEGIN}\n## Fault suite (`make faults`)\n\n"
        "Each fault from issue 9 against real components: SeaweedFS, Akosha 0.11, the "
        "daemon as an `akosha-sync serve` process, syncs as `akosha-sync sync` processes, "
        "and our fault proxy (`tests/support/proxy.py`) between us and the store. Data lost "
        "counts manifests that do not restore (an object they name is missing or fails its "
        "SHA-256, read back with minio) and acknowledged session ends never completed; it "
        "must be 0. Time to detect: from the fault (or the request) to the reported error "
        "or the recovered result. `tests/test_faults.py` runs the same faults, smaller.\n\n"
        f"{header}\n\n{table}\n{END}\n"
    )
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    README.write_text(text)


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=False)
    return f"commit {done.stdout.strip()}" if done.returncode == 0 else "this tree"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100,
                        help="size of the database killed mid-upload (scenario 1)")
    parser.add_argument("--only", default="", help="comma-separated scenario numbers")
    parser.add_argument("--write-readme", action="store_true",
                        help="replace the fault-suite section at the end of bench/README.md")
    parser.add_argument("--tree", default="",
                        help="what the table was measured on (default: the git commit)")
    args = parser.parse_args()
    # Our sync's info lines would drown the table; warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    chosen = [int(n) for n in args.only.split(",") if n] or list(SCENARIOS)
    root = Path(tempfile.mkdtemp(prefix="akosha-faults-"))
    bench = Bench(root, args.size_mb)
    rows: list[Row] = []
    started = time.monotonic()
    try:
        bench.start()
        for number in chosen:
            print(f"scenario {number} ...", file=sys.stderr, flush=True)
            try:
                got = SCENARIOS[number](bench)
                rows.extend(got if isinstance(got, list) else [got])
            except Exception as exc:  # one broken scenario must not hide the others
                row = Row(f"{number}. {SCENARIOS[number].__name__}", "(see tests/test_faults.py)")
                row.check(False, f"bench error: {type(exc).__name__}: {str(exc)[:150]}")
                rows.append(row)
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    header = (f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{time.monotonic() - started:.0f} s in all, `python bench/faults.py"
              f"{' --only ' + args.only if args.only else ''}` on {args.tree or _commit()}"
              f" ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}).")
    table = _table(rows)
    print(header)
    print(table)
    if args.write_readme:
        _write_readme(table, header)
    lost = sum(r.lost for r in rows)
    return 1 if lost or any(r.happened for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
