"""The durable queue shared by several processes: owned claims, recovery, pruning.

The other process is real (a Python subprocess on the same queue file); nothing
sleeps: the test reads the subprocess's line to know when its claim is committed.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from akosha_sync.server import queue as queue_module
from akosha_sync.server.queue import QUEUE_FILE, UNSET, JobQueue, owner_alive, process_owner

_CLAIMER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from akosha_sync.server.queue import JobQueue, process_owner
    claimed = JobQueue(Path(sys.argv[1])).claim_pending()
    print(process_owner(), *[r.id for r in claimed], flush=True)
    sys.stdin.read()  # hold the claim (stay alive) until the test closes stdin
""")


@contextmanager
def _other_process_claims(state: Path) -> Iterator[tuple[str, list[int]]]:
    """Another live process claims every pending request; yields its owner and ids."""
    proc = subprocess.Popen([sys.executable, "-c", _CLAIMER, str(state)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        owner, *ids = proc.stdout.readline().split()
        yield owner, [int(i) for i in ids]
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(30) == 0


def _finish(queue: JobQueue, ids: list[int], n: int) -> int:
    return queue.finish(ids, {"success": True, "method": "cloud", "upload_id": f"u-{n}"},
                        triggers=["manual"], started_at=1.0, finished_at=2.0)


def test_a_live_owners_requests_are_never_taken_a_dead_ones_are(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    first, second = queue.enqueue("session-end"), queue.enqueue("manual")
    with _other_process_claims(tmp_path) as (owner, claimed):
        assert claimed == [first, second]
        assert owner != process_owner() and owner_alive(owner)
        # A second daemon (or drain) starting beside it leaves its work alone.
        assert queue.recover() == 0
        assert queue.claim_pending() == []
        assert {queue.state_of(i).status for i in claimed} == {"running"}
        assert {queue.state_of(i).owner for i in claimed} == {owner}
        assert [(q["running"], q["interrupted"]) for q in queue.pending()] == [
            (True, False), (True, False)]
    # It exited (and was reaped) without finishing: its requests are recoverable,
    # and status shows them as interrupted (they were shown as nothing at all).
    assert not owner_alive(owner)
    assert [q.get("interrupted") for q in queue.pending()] == [True, True]
    assert [r.id for r in queue.claim_pending()] == [first, second]
    assert queue.state_of(first).owner == process_owner()


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    ours, reused, legacy = (queue.enqueue("manual") for _ in range(3))
    assert [r.id for r in queue.claim_pending()] == [ours, reused, legacy]
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:
            # This pid is alive, but it is not the process that claimed (start differs).
            con.execute("UPDATE requests SET claimed_by = ? WHERE id = ?",
                        (f"{os.getpid()}:another-start", reused))
            # An older version stored the bare pid: it cannot be verified.
            con.execute("UPDATE requests SET claimed_by = ? WHERE id = ?",
                        (os.getpid(), legacy))
    finally:
        con.close()
    assert queue.recover() == 2
    assert queue.state_of(ours).status == "running"  # we are alive: never taken
    assert queue.state_of(reused).status == queue.state_of(legacy).status == "pending"


def test_requests_without_a_method_run_as_configured(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    queue.enqueue("session-end")
    queue.enqueue("manual", method="http", enable_fallback=False)
    claimed = queue.claim_pending()
    assert [(r.method, r.enable_fallback) for r in claimed] == [(UNSET, None), ("http", False)]


def test_history_and_done_requests_keep_the_newest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "KEEP_HISTORY", 5)
    monkeypatch.setattr(queue_module, "KEEP_DONE_REQUESTS", 4)
    queue = JobQueue(tmp_path)
    last = 0
    for n in range(12):
        last = queue.enqueue("manual")
        _finish(queue, [r.id for r in queue.claim_pending()], n)
    waiting = queue.enqueue("session-end")
    running = queue.enqueue("manual")
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:
            con.execute("UPDATE requests SET status = 'running', claimed_by = ? WHERE id = ?",
                        (process_owner(), running))
        _finish(queue, [], 12)  # a sync that served nothing still prunes
        assert con.execute("SELECT count(*) FROM history").fetchone() == (5,)
        assert con.execute("SELECT count(*) FROM requests WHERE status = 'done'"
                           ).fetchone() == (4,)
    finally:
        con.close()
    assert [h["upload_id"] for h in queue.history(10)] == [f"u-{n}" for n in range(12, 7, -1)]
    assert queue.result_of(last) == {"success": True, "method": "cloud", "upload_id": "u-11"}
    assert queue.state_of(waiting).status == "pending"  # never pruned
    assert queue.state_of(running).status == "running"


def test_a_failed_session_end_waits_to_retry_and_a_waited_for_request_is_done(
    tmp_path: Path,
) -> None:
    queue = JobQueue(tmp_path)
    queue.retry_delays = (3600.0, 7200.0)  # the clock seam: far off, then moved by hand
    session = queue.enqueue("session-end")
    manual = queue.enqueue("manual")
    ids = [r.id for r in queue.claim_pending()]
    queue.finish(ids, {"success": False, "method": "cloud", "error": "store down"},
                 triggers=["session-end", "manual"], started_at=1.0, finished_at=2.0)
    assert queue.state_of(manual).status == "done"  # its caller has the failure
    state = queue.state_of(session)
    assert state.status == "pending" and state.result is not None  # the failure it had
    (waiting,) = queue.pending()
    assert waiting["id"] == session and waiting["failed_attempts"] == 1
    assert waiting["last_error"] == "store down"
    # Not due: nothing is claimed, the idle worker is told how long to wait.
    assert queue.pending_count() == 0 and queue.claim_pending() == []
    assert 3590 < (queue.seconds_to_next_retry() or 0) <= 3600
    # Asked to run the queue now (drain), it is claimed all the same; put back here.
    assert [r.id for r in queue.claim_pending(even_if_not_due=True)] == [session]
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:
            con.execute("UPDATE requests SET status = 'pending' WHERE id = ?", (session,))
    finally:
        con.close()
    # A new request is due at once and takes the waiting one along into its sync.
    fresh = queue.enqueue("manual")
    assert [r.id for r in queue.claim_pending()] == [session, fresh]
    queue.finish([session, fresh], {"success": False, "error": "still down"},
                 triggers=["session-end", "manual"], started_at=3.0, finished_at=4.0)
    assert queue.pending()[0]["failed_attempts"] == 2
    assert 7190 < (queue.seconds_to_next_retry() or 0) <= 7200  # the next delay
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:  # the clock moves on: the retry is due
            con.execute("UPDATE requests SET retry_at = 0 WHERE id = ?", (session,))
    finally:
        con.close()
    assert [r.id for r in queue.claim_pending()] == [session]
    _finish(queue, [session], 1)
    assert queue.state_of(session).status == "done" and queue.pending() == []
    assert queue.seconds_to_next_retry() is None


def test_a_retry_set_while_the_clock_ran_ahead_is_due_once_it_is_set_right(
    tmp_path: Path,
) -> None:
    """A session end failed while the clock was 2 hours ahead (a laptop offline before
    NTP set it right); its 30 s retry was written 2 hours and 30 s ahead of the real
    time. Before, it waited those 2 hours; a retry further ahead than the longest delay
    can only come from a clock set back, and is due now."""
    queue = JobQueue(tmp_path)
    session = queue.enqueue("session-end")
    ids = [r.id for r in queue.claim_pending()]
    queue.finish(ids, {"success": False, "method": "cloud", "error": "offline"},
                 triggers=["session-end"], started_at=1.0, finished_at=2.0)
    assert queue.claim_pending() == []  # its first retry is 30 s away: not due
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:  # what the clock 2 hours ahead wrote
            con.execute("UPDATE requests SET retry_at = ? WHERE id = ?",
                        (time.time() + 7200 + 30, session))
    finally:
        con.close()
    assert queue.seconds_to_next_retry() == 0.0
    assert queue.pending_count() == 1
    assert [r.id for r in queue.claim_pending()] == [session]


def test_a_queue_from_before_retries_gets_the_columns_and_keeps_its_requests(
    tmp_path: Path,
) -> None:
    con = sqlite3.connect(tmp_path / QUEUE_FILE)
    try:
        with con:
            con.executescript("""
                CREATE TABLE requests (
                    id INTEGER PRIMARY KEY AUTOINCREMENT, trigger TEXT NOT NULL,
                    method TEXT NOT NULL DEFAULT 'unset', enable_fallback INTEGER,
                    payload TEXT NOT NULL DEFAULT '{}', received_at REAL NOT NULL,
                    status TEXT NOT NULL DEFAULT 'pending', claimed_by TEXT,
                    history_id INTEGER);
                INSERT INTO requests (trigger, received_at) VALUES ('session-end', 1.0);
            """)
    finally:
        con.close()
    queue = JobQueue(tmp_path)
    (request,) = queue.claim_pending()
    assert request.trigger == "session-end"
    queue.finish([request.id], {"success": False, "error": "down"}, triggers=["session-end"],
                 started_at=1.0, finished_at=2.0)
    assert queue.pending()[0]["failed_attempts"] == 1


def test_a_failed_sync_that_committed_an_upload_is_not_retried(tmp_path: Path) -> None:
    """One database unreadable, the other committed: a retry would only commit it again."""
    queue = JobQueue(tmp_path)
    session = queue.enqueue("session-end")
    queue.claim_pending()
    queue.finish([session], {"success": False, "error": "x is not a readable DuckDB database",
                             "manifest_key": "systems/h/uploads/u/manifest.json"},
                 triggers=["session-end"], started_at=1.0, finished_at=2.0)
    assert queue.state_of(session).status == "done" and queue.pending() == []



def test_a_sync_run_outside_the_queue_serves_only_what_it_covered(tmp_path: Path) -> None:
    """`akosha-sync sync` by hand: the failed session end it covered is done, with the
    sync's result; a request for another method, one received after the sync started
    and one another process runs are left as they were."""
    queue = JobQueue(tmp_path)
    queue.retry_delays = (3600.0,)
    taken = queue.enqueue("session-end")
    with _other_process_claims(tmp_path) as (_, running):
        assert running == [taken]
        failed = queue.enqueue("session-end")
        assert [r.id for r in queue.claim_pending()] == [failed]
        queue.finish([failed], {"success": False, "error": "store down"},
                     triggers=["session-end"], started_at=1.0, finished_at=2.0)
        other_method = queue.enqueue("session-end", method="http")
        started = time.time()
        late = queue.enqueue("session-end")
        covers = lambda r: r.method == UNSET  # noqa: E731
        assert queue.served_by({"success": False, "error": "down"}, covers=covers,
                               trigger="cli", started_at=started, finished_at=started) == 0
        result = {"success": True, "method": "cloud", "upload_id": "u-by-hand"}
        assert queue.served_by(result, covers=covers, trigger="cli", started_at=started,
                               finished_at=started + 1) == 1
        assert queue.state_of(failed).status == "done"
        assert queue.result_of(failed) == result
        assert queue.state_of(other_method).status == "pending"
        assert queue.state_of(late).status == "pending"
        assert queue.state_of(taken).status == "running"
        (record,) = queue.history(1)
        assert record["triggered_by"] == "cli,session-end" and record["requests_served"] == 1
        assert [q["id"] for q in queue.pending()] == [taken, other_method, late]
