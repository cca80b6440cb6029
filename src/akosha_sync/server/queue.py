"""The durable job queue and sync history: one small SQLite file in ``state_dir``.

A request (hook, tool, CLI) is committed here *before* it is acknowledged, so a
crash after the acknowledgement cannot lose it. The daemon claims every pending
request at once (they collapse into one sync), and a request claimed by a process
that died goes back to pending at the next start.

Only the standard library is imported: the session-end hook command uses this
module directly when the daemon is not running, and must start fast.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from akosha_sync._fs import private_dir, private_file

__all__ = ["QUEUE_FILE", "JobQueue", "Request"]

QUEUE_FILE = "queue.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trigger TEXT NOT NULL,
    method TEXT NOT NULL DEFAULT 'auto',
    enable_fallback INTEGER,
    payload TEXT NOT NULL DEFAULT '{}',
    received_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done
    claimed_by INTEGER,
    history_id INTEGER
);
CREATE INDEX IF NOT EXISTS requests_status ON requests(status);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    triggers TEXT NOT NULL,
    method TEXT,
    success INTEGER NOT NULL,
    upload_id TEXT,
    error TEXT,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    duration_seconds REAL NOT NULL,
    requests INTEGER NOT NULL,
    result TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Request:
    id: int
    trigger: str
    method: str
    enable_fallback: bool | None
    payload: dict[str, Any]
    received_at: float


class JobQueue:
    """SQLite-backed queue; every method is a short transaction, safe across processes."""

    def __init__(self, state_dir: Path) -> None:
        private_dir(state_dir)
        self.path = private_file(state_dir / QUEUE_FILE)  # its -wal/-shm inherit 0600
        with self._connect() as con:
            con.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an acknowledged request survives power loss
            yield con
        finally:
            con.close()

    def enqueue(
        self,
        trigger: str,
        *,
        method: str = "auto",
        enable_fallback: bool | None = None,
        payload: dict[str, Any] | None = None,
    ) -> int:
        """Record a request durably; returns its id."""
        with self._connect() as con:
            cur = con.execute(
                "INSERT INTO requests (trigger, method, enable_fallback, payload, received_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    trigger,
                    method,
                    None if enable_fallback is None else int(enable_fallback),
                    json.dumps(payload or {}),
                    time.time(),
                ),
            )
            return int(cur.lastrowid or 0)

    def claim_pending(self) -> list[Request]:
        """Mark every pending request running (for this process) and return them."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute(
                "SELECT id, trigger, method, enable_fallback, payload, received_at "
                "FROM requests WHERE status = 'pending' ORDER BY id"
            ).fetchall()
            if rows:
                con.execute(
                    f"UPDATE requests SET status = 'running', claimed_by = ? "
                    f"WHERE id IN ({','.join('?' * len(rows))})",
                    (os.getpid(), *[r[0] for r in rows]),
                )
            con.execute("COMMIT")
        return [
            Request(
                id=r[0],
                trigger=r[1],
                method=r[2],
                enable_fallback=None if r[3] is None else bool(r[3]),
                payload=json.loads(r[4]),
                received_at=r[5],
            )
            for r in rows
        ]

    def release(self, ids: list[int]) -> None:
        """Give claimed requests back (a sync was interrupted before finishing)."""
        if not ids:
            return
        with self._connect() as con:
            con.execute(
                f"UPDATE requests SET status = 'pending', claimed_by = NULL "
                f"WHERE id IN ({','.join('?' * len(ids))})",
                ids,
            )

    def recover(self) -> int:
        """At start: requests left 'running' by a dead process become pending again."""
        with self._connect() as con:
            cur = con.execute(
                "UPDATE requests SET status = 'pending', claimed_by = NULL "
                "WHERE status = 'running'"
            )
            return cur.rowcount

    def finish(
        self,
        ids: list[int],
        result: dict[str, Any],
        *,
        triggers: list[str],
        started_at: float,
        finished_at: float,
    ) -> int:
        """Record the sync that served these requests; returns the history id."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            cur = con.execute(
                "INSERT INTO history (triggers, method, success, upload_id, error, started_at, "
                "finished_at, duration_seconds, requests, result) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ",".join(sorted(set(triggers))),
                    result.get("method"),
                    int(bool(result.get("success"))),
                    result.get("upload_id"),
                    result.get("error"),
                    started_at,
                    finished_at,
                    round(finished_at - started_at, 3),
                    len(ids),
                    json.dumps(result, default=str),
                ),
            )
            history_id = int(cur.lastrowid or 0)
            if ids:
                con.execute(
                    f"UPDATE requests SET status = 'done', history_id = ? "
                    f"WHERE id IN ({','.join('?' * len(ids))})",
                    (history_id, *ids),
                )
            con.execute("COMMIT")
            return history_id

    def pending_count(self) -> int:
        with self._connect() as con:
            row = con.execute(
                "SELECT count(*) FROM requests WHERE status = 'pending'"
            ).fetchone()
            return int(row[0])

    def pending(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, trigger, method, received_at FROM requests "
                "WHERE status = 'pending' ORDER BY id LIMIT 50"
            ).fetchall()
        return [
            {"id": r[0], "trigger": r[1], "method": r[2], "received_at": _iso(r[3])} for r in rows
        ]

    def result_of(self, request_id: int) -> dict[str, Any] | None:
        """The result of the sync that served a request, once it is done."""
        with self._connect() as con:
            row = con.execute(
                "SELECT h.result FROM requests r JOIN history h ON h.id = r.history_id "
                "WHERE r.id = ?",
                (request_id,),
            ).fetchone()
        return json.loads(row[0]) if row else None

    def history(self, limit: int = 10) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, triggers, method, success, upload_id, error, started_at, "
                "duration_seconds, requests FROM history ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            {
                "id": r[0],
                "triggered_by": r[1],
                "method": r[2],
                "success": bool(r[3]),
                "upload_id": r[4],
                "error": r[5],
                "started_at": _iso(r[6]),
                "duration_seconds": r[7],
                "requests_served": r[8],
            }
            for r in rows
        ]

    def last_result(self) -> dict[str, Any] | None:
        with self._connect() as con:
            row = con.execute("SELECT result FROM history ORDER BY id DESC LIMIT 1").fetchone()
        return json.loads(row[0]) if row else None


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
