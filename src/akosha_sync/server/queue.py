"""The durable job queue and sync history: one small SQLite file in ``state_dir``.

A request (hook, tool, CLI) is committed here *before* it is acknowledged, so a
crash after the acknowledgement cannot lose it. A worker claims every pending
request at once (they collapse into one sync). Several processes share the file
(a daemon per Claude Code session, ``drain`` beside ``serve``), so a claim is owned:
the owner is the claiming process's pid plus its start time (and the boot id), so
a pid reused by another process is not mistaken for the owner. A live owner's
requests are never taken; a dead owner's go back to pending whenever anyone claims.
The ``requests`` and ``history`` tables keep the newest ``KEEP_DONE_REQUESTS`` and
``KEEP_HISTORY`` rows.

A session end (or pre-compact) has nobody waiting for its answer, so when its sync
fails and commits nothing (the store down, the laptop offline, another sync holding
the lock past the budget) it is not done: it goes back to pending with a later
``retry_at``, backing off along ``RETRY_DELAYS`` (the last repeats, for ever), until
a sync serves it.
A request somebody waits for (a tool call, ``sync``) is done either way: its caller
has the failure and decides. Claiming takes every pending request once any is due,
so a retry rides along with the next sync whatever triggered it.

Only the standard library is imported: the session-end hook command uses this
module directly when the daemon is not running, and must start fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from akosha_sync._fs import private_dir, private_file, set_aside

__all__ = [
    "KEEP_DONE_REQUESTS",
    "KEEP_HISTORY",
    "QUEUE_FILE",
    "RETRIED_TRIGGERS",
    "RETRY_DELAYS",
    "UNSET",
    "JobQueue",
    "Request",
    "RequestState",
    "owner_alive",
    "process_owner",
]

QUEUE_FILE = "queue.sqlite3"
UNSET = "unset"  # a request without an explicit method: the configured force_method runs
KEEP_HISTORY = 1000  # newest sync records kept
KEEP_DONE_REQUESTS = 1000  # newest finished requests kept (pending/running are never pruned)
RETRIED_TRIGGERS = frozenset({"session-end", "pre-compact"})  # nobody waits for their answer
RETRY_DELAYS = (30.0, 60.0, 120.0, 300.0, 900.0)  # before attempt 2, 3, ...; the last repeats
# Due: its retry time has come, or lies further ahead than any delay can put it (the
# clock was set back since: else a 30 s retry would wait as long as the clock moved).
_DUE = "(retry_at <= ? OR retry_at > ?)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    trigger TEXT NOT NULL,
    method TEXT NOT NULL DEFAULT 'unset',
    enable_fallback INTEGER,
    payload TEXT NOT NULL DEFAULT '{}',
    received_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending | running | done
    claimed_by TEXT,                          -- owner: see process_owner()
    history_id INTEGER,                       -- the sync that served it (or failed it last)
    attempts INTEGER NOT NULL DEFAULT 0,      -- failed syncs so far (retried triggers only)
    retry_at REAL NOT NULL DEFAULT 0          -- not claimed before this time
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


@dataclass(frozen=True)
class RequestState:
    """Where a request stands: pending | running | done | missing (pruned or never)."""

    status: str
    owner: str | None = None
    result: dict[str, Any] | None = None


_HAVE_PROC = Path("/proc/self/stat").exists()
_log = logging.getLogger("akosha_sync.queue")
# SQLite's codes for a file that is not (or no longer) a whole database.
_DAMAGE_CODES = {getattr(sqlite3, "SQLITE_CORRUPT", 11), getattr(sqlite3, "SQLITE_NOTADB", 26)}


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF in _DAMAGE_CODES  # extended codes keep the primary low
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (an opaque token), or None if no such process runs."""
    if _HAVE_PROC:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # comm (field 2) may hold spaces: fields 3.. follow its closing parenthesis.
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] in ("Z", "X"):  # exited, not yet reaped: not an owner any more
            return None
        return f"{_boot_id()}/{fields[19]}"  # field 22: start, in ticks since boot
    try:  # no /proc (macOS, BSD): ps prints the absolute start time
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


@cache
def _own_owner(pid: int) -> str:
    return f"{pid}:{_start_time(pid) or ''}"


def process_owner() -> str:
    """This process as a queue owner: ``pid:start``, unique over pid reuse and reboots."""
    return _own_owner(os.getpid())


def owner_alive(owner: str | None) -> bool:
    """Whether the process that claimed a request still runs.

    An owner without a start time (a queue written by an older version, which stored
    only the pid) cannot be told from a reused pid and counts as dead.
    """
    if not owner:
        return False
    if owner == process_owner():
        return True
    pid, sep, start = str(owner).partition(":")
    if not sep or not start or not pid.isdigit():
        return False
    return _start_time(int(pid)) == start


class JobQueue:
    """SQLite-backed queue; every method is a short transaction, safe across processes."""

    #: The clock seam: seconds before each retry of a failed session end (tests shorten it).
    retry_delays: tuple[float, ...] = RETRY_DELAYS

    def __init__(self, state_dir: Path) -> None:
        private_dir(state_dir)
        self.path = private_file(state_dir / QUEUE_FILE)  # its -wal/-shm inherit 0600
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                raise  # locked, read-only, full disk: not the file's fault
            self._recover(exc)

    def _open(self) -> None:
        with self._connect() as con:
            check = con.execute("PRAGMA quick_check").fetchone()
            if not check or check[0] != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            con.executescript(_SCHEMA)
            _add_missing_columns(con)

    def _recover(self, exc: sqlite3.DatabaseError) -> None:
        """Move a damaged queue file aside (never delete it) and start a new one.

        Under a lock, checked again first: several processes may find it damaged at
        once, and only the first may move it (a later one would move the new queue).
        """
        lock = os.open(self.path.with_name(QUEUE_FILE + ".recovery-lock"),
                       os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._open()
                return  # another process recovered it meanwhile
            except sqlite3.DatabaseError as again:
                if not _damaged(again):
                    raise
            moved = set_aside(self.path, "-wal", "-shm")
            private_file(self.path)
            self._open()
        finally:
            os.close(lock)  # releases the lock
        _log.warning(
            "the queue database %s is damaged (%s) and was moved aside to %s; a new, empty "
            "queue was created: session ends it held and the sync history are not in the new "
            "one (the next session end or `akosha-sync sync` uploads everything anyway)",
            self.path.name, exc, moved.name,
        )

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
        method: str = UNSET,
        enable_fallback: bool | None = None,
        payload: dict[str, Any] | None = None,
    ) -> int:
        """Record a request durably; returns its id. ``method`` UNSET and
        ``enable_fallback`` None mean "as configured" when the request runs."""
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

    def _due_now(self) -> tuple[float, float]:
        """The parameters of ``_DUE``: now, and the furthest a retry can be from now."""
        now = time.time()
        return now, now + max(self.retry_delays) + 1

    def claim_pending(self, *, even_if_not_due: bool = False) -> list[Request]:
        """Mark every pending request running (for this process) and return them.

        Nothing is claimed until at least one request is due (its ``retry_at`` passed),
        unless ``even_if_not_due`` (someone asked to run the queue now); then every
        pending one is, since one sync serves them all. Requests a dead process had
        claimed count as pending; a live owner's stay its own.
        """
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            _recover_dead(con)
            due = even_if_not_due or con.execute(
                f"SELECT count(*) FROM requests WHERE status = 'pending' AND {_DUE}",
                self._due_now(),
            ).fetchone()[0]
            rows = con.execute(
                "SELECT id, trigger, method, enable_fallback, payload, received_at "
                "FROM requests WHERE status = 'pending' ORDER BY id"
            ).fetchall() if due else []
            if rows:
                con.execute(
                    f"UPDATE requests SET status = 'running', claimed_by = ? "
                    f"WHERE id IN ({','.join('?' * len(rows))})",
                    (process_owner(), *[r[0] for r in rows]),
                )
            con.execute("COMMIT")
        return [_request(r) for r in rows]

    def release(self, ids: list[int]) -> None:
        """Give this process's claimed requests back (a sync was interrupted)."""
        if not ids:
            return
        with self._connect() as con:
            con.execute(
                f"UPDATE requests SET status = 'pending', claimed_by = NULL "
                f"WHERE status = 'running' AND claimed_by = ? "
                f"AND id IN ({','.join('?' * len(ids))})",
                (process_owner(), *ids),
            )

    def recover(self) -> int:
        """Requests left 'running' by a dead process become pending; returns how many.

        A live owner's requests are left alone: another daemon is running them.
        """
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            count = _recover_dead(con)
            con.execute("COMMIT")
            return count

    def state_of(self, request_id: int) -> RequestState:
        """A request's status, owner and (once done) the result of the sync that served it."""
        with self._connect() as con:
            row = con.execute(
                "SELECT r.status, r.claimed_by, h.result FROM requests r "
                "LEFT JOIN history h ON h.id = r.history_id WHERE r.id = ?",
                (request_id,),
            ).fetchone()
        if row is None:
            return RequestState("missing")
        return RequestState(
            str(row[0]),
            None if row[1] is None else str(row[1]),
            None if row[2] is None else json.loads(row[2]),
        )

    def finish(
        self,
        ids: list[int],
        result: dict[str, Any],
        *,
        triggers: list[str],
        started_at: float,
        finished_at: float,
    ) -> int:
        """Record the sync that served these requests; returns the history id.

        When it failed, the retried triggers among them go back to pending, due
        after the next of ``retry_delays``; the rest are done.
        """
        now = time.time()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            history_id = _record(con, result, triggers, len(ids), started_at, finished_at)
            marks = ",".join("?" * len(ids))
            # Committed with a database left out (unreadable: carried over at its last
            # version) is done: a retry would commit the same again, or need the user.
            if ids and not result.get("success") and not result.get("manifest_key"):
                for request_id, attempts in con.execute(
                    f"SELECT id, attempts FROM requests WHERE id IN ({marks}) "
                    f"AND trigger IN ({','.join('?' * len(RETRIED_TRIGGERS))})",
                    (*ids, *sorted(RETRIED_TRIGGERS)),
                ).fetchall():
                    delay = self.retry_delays[min(attempts, len(self.retry_delays) - 1)]
                    con.execute(
                        "UPDATE requests SET status = 'pending', claimed_by = NULL, "
                        "history_id = ?, attempts = attempts + 1, retry_at = ? WHERE id = ?",
                        (history_id, now + delay, request_id),
                    )
            if ids:
                con.execute(
                    f"UPDATE requests SET status = 'done', history_id = ? "
                    f"WHERE status = 'running' AND id IN ({marks})",
                    (history_id, *ids),
                )
            _prune(con)
            con.execute("COMMIT")
            return history_id

    def served_by(
        self,
        result: dict[str, Any],
        *,
        covers: Callable[[Request], bool],
        trigger: str,
        started_at: float,
        finished_at: float,
    ) -> int:
        """Mark done the pending requests that a sync run outside the queue served too
        (``akosha-sync sync`` run by hand); returns how many.

        Only for a successful ``result``, and only requests received before the sync
        started (it read the databases as they were then, or later) for which
        ``covers`` says it ran their method. Without this, a session end that failed
        while the store was down would show as failed, and sync again at its retry
        time, after the user had synced by hand. Requests another process is running
        are left to it.
        """
        if not result.get("success"):
            return 0
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute(
                "SELECT id, trigger, method, enable_fallback, payload, received_at "
                "FROM requests WHERE status = 'pending' AND received_at < ? ORDER BY id",
                (started_at,),
            ).fetchall()
            served = [request for request in map(_request, rows) if covers(request)]
            if not served:
                con.execute("COMMIT")
                return 0
            history_id = _record(
                con, result, [trigger, *(r.trigger for r in served)], len(served),
                started_at, finished_at,
            )
            con.execute(
                f"UPDATE requests SET status = 'done', history_id = ? "
                f"WHERE status = 'pending' AND id IN ({','.join('?' * len(served))})",
                (history_id, *[r.id for r in served]),
            )
            _prune(con)
            con.execute("COMMIT")
            return len(served)

    def pending_count(self) -> int:
        """Pending requests that are due now (a failed one waiting to retry is not)."""
        with self._connect() as con:
            row = con.execute(
                f"SELECT count(*) FROM requests WHERE status = 'pending' AND {_DUE}",
                self._due_now(),
            ).fetchone()
            return int(row[0])

    def seconds_to_next_retry(self) -> float | None:
        """How long until the earliest waiting retry is due; None when none waits."""
        with self._connect() as con:
            row = con.execute(
                "SELECT min(retry_at) FROM requests WHERE status = 'pending'"
            ).fetchone()
        if row[0] is None:
            return None
        wait = float(row[0]) - time.time()
        return 0.0 if wait > max(self.retry_delays) + 1 else max(0.0, wait)

    def pending(self) -> list[dict[str, Any]]:
        """Up to 50 requests not yet served: pending ones (a failed one says how often
        and when it retries) and running ones (``interrupted`` when the process that
        ran them died: the next daemon or drain runs them again)."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT r.id, r.trigger, r.method, r.received_at, r.attempts, r.retry_at, "
                "h.error, r.status, r.claimed_by FROM requests r "
                "LEFT JOIN history h ON h.id = r.history_id "
                "WHERE r.status IN ('pending', 'running') ORDER BY r.id LIMIT 50"
            ).fetchall()
        out: list[dict[str, Any]] = []
        for r in rows:
            item: dict[str, Any] = {
                "id": r[0], "trigger": r[1], "method": r[2], "received_at": _iso(r[3])}
            if r[7] == "running":
                item["running"] = True
                item["interrupted"] = not owner_alive(r[8])
            if r[4]:
                item.update(failed_attempts=r[4], retry_at=_iso(r[5]), last_error=r[6])
            out.append(item)
        return out

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


def _request(row: tuple[Any, ...]) -> Request:
    """A ``requests`` row (id, trigger, method, enable_fallback, payload, received_at)."""
    return Request(
        id=row[0],
        trigger=row[1],
        method=row[2],
        enable_fallback=None if row[3] is None else bool(row[3]),
        payload=json.loads(row[4]),
        received_at=row[5],
    )


def _record(
    con: sqlite3.Connection,
    result: dict[str, Any],
    triggers: list[str],
    requests: int,
    started_at: float,
    finished_at: float,
) -> int:
    """Inside a write transaction: a history row for one sync; returns its id."""
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
            requests,
            json.dumps(result, default=str),
        ),
    )
    return int(cur.lastrowid or 0)


def _add_missing_columns(con: sqlite3.Connection) -> None:
    """A queue written by an older version lacks the retry columns: add them."""
    have = {row[1] for row in con.execute("PRAGMA table_info(requests)")}
    for column, spec in (("attempts", "INTEGER NOT NULL DEFAULT 0"),
                         ("retry_at", "REAL NOT NULL DEFAULT 0")):
        if column not in have:
            with contextlib.suppress(sqlite3.OperationalError):  # another process won the race
                con.execute(f"ALTER TABLE requests ADD COLUMN {column} {spec}")


def _recover_dead(con: sqlite3.Connection) -> int:
    """Inside a write transaction: dead owners' running requests back to pending."""
    owners = [r[0] for r in con.execute(
        "SELECT DISTINCT claimed_by FROM requests WHERE status = 'running'"
    ).fetchall()]
    dead = [o for o in owners if not owner_alive(None if o is None else str(o))]
    count = 0
    for owner in dead:  # a handful at most: one per process that ever claimed
        cur = con.execute(
            "UPDATE requests SET status = 'pending', claimed_by = NULL "
            "WHERE status = 'running' AND claimed_by IS ?",
            (owner,),
        )
        count += cur.rowcount
    return count


def _prune(con: sqlite3.Connection) -> None:
    """Inside a write transaction: keep only the newest history rows and done requests."""
    con.execute(
        "DELETE FROM history WHERE id <= "
        "(SELECT id FROM history ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (KEEP_HISTORY,),
    )
    con.execute(
        "DELETE FROM requests WHERE status = 'done' AND id <= "
        "(SELECT id FROM requests WHERE status = 'done' ORDER BY id DESC LIMIT 1 OFFSET ?)",
        (KEEP_DONE_REQUESTS,),
    )


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
