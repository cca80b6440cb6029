"""The daemon core: a process-level task group that runs syncs from the durable queue.

Requests from tools, hooks and the CLI land in the queue first. One worker claims
everything pending at once, so any number of triggers that arrive while a sync runs
collapse into one follow-up sync; and a follow-up is skipped when the databases did
not change since the sync it waited for started. Only one upload runs at a time
(and the state-folder lock keeps a CLI run out too).

A session end whose sync fails stays queued and is retried with a growing delay
(see ``queue``); a request a caller waits for gets the failure as its answer.

On shutdown a running sync gets ``grace_seconds`` to finish; otherwise it is
cancelled, nothing is committed (the manifest is written last) and its requests
return to pending for the next start.

Other processes share the queue (a stdio server per Claude Code session, ``drain``
beside ``serve``): any of them may run a request, so a waiter polls the queue as
well as its in-process event, and every wait is bounded. An unexpected error in a
sync (the state folder, a DuckDB or SQLite error) is that sync's failed result,
never the end of the daemon.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import structlog

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.service import apply_configured_retention
from akosha_sync.server.payload import HookPayloadError, validate_hook_payload
from akosha_sync.server.queue import (
    RETRIED_TRIGGERS,
    UNSET,
    JobQueue,
    Request,
    RequestState,
    owner_alive,
)
from akosha_sync.sync.protocol import SyncResult
from akosha_sync.sync.runner import run_sync
from akosha_sync.sync.snapshot import SourceFingerprint, fingerprint
from akosha_sync.sync.status import local_status

__all__ = ["HookPayloadError", "SyncDaemon", "validate_hook_payload"]

log = structlog.get_logger("akosha_sync.daemon")

ProgressListener = Callable[[str, int, int], None]

_POLL_SECONDS = 0.5  # a waiter looks at the queue this often (another process may serve it)
_SWEEP_SECONDS = 30.0  # an idle worker looks for dead owners' and other processes' requests
_ERROR_BACKOFF_SECONDS = 5.0  # the worker's pause after the queue itself failed
_KEEP_RESULTS = 256  # in-memory results kept for waiters when the history write failed


class SyncDaemon:
    """Owns the task group; everything long-running happens inside it."""

    def __init__(
        self,
        config: AkoshaSyncConfig,
        *,
        grace_seconds: float = 10.0,
        wait_seconds: float | None = None,
        hand_over: bool = False,
        config_path: str | None = None,
    ) -> None:
        self.config = config
        self.grace_seconds = grace_seconds
        # A sync cut short at shutdown leaves its requests queued; with ``hand_over``
        # a one-shot ``drain`` (``config_path``, else the same config discovery) is
        # started to run them, as a hook does: else, with no other daemon, they wait
        # for the next session (the last session end of the day would).
        self.hand_over = hand_over
        self.config_path = config_path
        self._cut_short = False
        # A waiter may sit behind one running sync and then its own.
        self.wait_seconds = (
            2 * config.upload_timeout_seconds + 60 if wait_seconds is None else wait_seconds
        )
        self.queue = JobQueue(config.state_path)
        self.started_at = time.time()
        self.transport = ""
        self.current: dict[str, Any] | None = None
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._done: dict[int, anyio.Event] = {}
        self._results: dict[int, dict[str, Any]] = {}
        self._listeners: dict[int, ProgressListener] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._settled = False  # shutdown's grace is over: waiters are answered at once
        self._unreleased: list[int] = []  # claimed, not recorded, not yet given back
        self._loop_thread = threading.get_ident()
        # Per (method, fallback): when the last successful sync started and finished,
        # and the sources as they were when it started.
        self._last_sync: dict[tuple[str, bool | None], tuple[float, float, Any]] = {}

    # ----------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SyncDaemon]:
        """Run the worker for the duration of the block; shut down gracefully after."""
        self._loop_thread = threading.get_ident()
        recovered = self.queue.recover()
        if recovered:
            log.info("resuming requests left by an earlier run", count=recovered)
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                tg.start_soon(self._worker)
                tg.start_soon(self._sync_periodically)
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._shutdown(tg)
        finally:
            # After the task group: the cut-short sync has given its requests back.
            if self._cut_short and self.hand_over:
                from akosha_sync.server.hook import spawn_drain

                log.info("a one-shot drain runs the requests of the sync cut short")
                spawn_drain(self.config_path)

    async def settle(self) -> None:
        """The first half of a shutdown, while the transport still serves: the running
        sync gets ``grace_seconds`` to finish, then every caller still waiting gets its
        answer (its request stays queued), so none is left hanging on a dropped
        connection. Idempotent; ``running()`` calls it on the way out too."""
        if self._settled:
            return
        if not self._idle.is_set():
            log.info("waiting for the running sync to finish", grace_seconds=self.grace_seconds)
            with anyio.move_on_after(self.grace_seconds):
                await self._idle.wait()
        self._settled = True
        for event in list(self._done.values()):
            event.set()

    async def _shutdown(self, tg: anyio.abc.TaskGroup) -> None:
        await self.settle()
        if not self._idle.is_set():
            self._cut_short = True
            log.warning("sync cancelled at shutdown; its requests stay queued")
        tg.cancel_scope.cancel()

    # -------------------------------------------------------------- intake
    async def submit(
        self,
        trigger: str,
        *,
        method: str | None = None,
        enable_fallback: bool | None = None,
        payload: dict[str, Any] | None = None,
    ) -> int:
        """Record a request durably and wake the worker; returns the request id.

        ``method`` None and ``enable_fallback`` None: as configured when it runs.

        The write (an fsync) runs in a worker thread so that a busy disk during an
        upload does not stall every other request on the event loop.
        """
        request_id = await anyio.to_thread.run_sync(
            lambda: self.queue.enqueue(
                trigger, method=method or UNSET, enable_fallback=enable_fallback,
                payload=payload,
            )
        )
        self._wake.set()
        log.info("sync requested", trigger=trigger, request_id=request_id,
                 method=method or UNSET)
        return request_id

    async def submit_hook(self, body: Any) -> int | None:
        """Queue a session-end sync; None when upload_on_session_end is off."""
        payload = validate_hook_payload(body)
        if not self.config.upload_on_session_end:
            log.info("session end ignored: upload_on_session_end is off")
            return None
        trigger = "session-end" if payload["hook_event_name"] == "SessionEnd" else "pre-compact"
        return await self.submit(trigger, payload=payload)

    async def wait_for(
        self,
        request_id: int,
        progress: ProgressListener | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Wait until the sync serving ``request_id`` is done and return its result.

        Whichever process runs it: the in-process event wakes at once, the queue is
        polled for a sync another process ran. After ``timeout`` (default
        ``wait_seconds``) the answer is a failure saying the request is still queued.
        """
        if progress is not None:
            self._listeners[request_id] = progress
        done = self._done.setdefault(request_id, anyio.Event())
        status = "pending"
        budget = self.wait_seconds if timeout is None else timeout
        try:
            with anyio.move_on_after(budget):
                while True:
                    # The event is registered before the check: a sync finishing in
                    # between still sets it.
                    if request_id in self._results:
                        return self._results.pop(request_id)
                    if self._settled:
                        return {
                            **self._failure(
                                UNSET, f"the daemon is shutting down; request {request_id} "
                                "stays queued and runs when a daemon starts again",
                                trigger=""),
                            "request_id": request_id,
                            "queued": True,
                        }
                    state, owner_gone = await anyio.to_thread.run_sync(
                        self._look_up, request_id)
                    status = state.status
                    if state.result is not None:
                        return state.result
                    if status in ("done", "missing"):
                        return self._failure(
                            UNSET, f"request {request_id} is {status} but its result is no "
                            "longer in the queue's history (pruned); see akosha_sync_status",
                            trigger="",
                        )
                    if status == "pending" or owner_gone:
                        self._wake.set()  # ours to run (or a dead owner's: claim recovers it)
                    with anyio.move_on_after(_POLL_SECONDS):
                        await done.wait()
        finally:
            self._listeners.pop(request_id, None)
            self._done.pop(request_id, None)
            self._results.pop(request_id, None)
        log.warning("gave up waiting for a request", request_id=request_id, status=status)
        return {
            **self._failure(
                UNSET,
                f"request {request_id} is still {status} after {budget:.0f} s "
                "(a sync ahead of it is taking long); it stays queued and runs, and "
                "akosha_sync_status shows its result",
                trigger="",
            ),
            "request_id": request_id,
            "queued": True,
        }

    def _look_up(self, request_id: int) -> tuple[RequestState, bool]:
        """The request's state, and whether it is running under a dead owner."""
        state = self.queue.state_of(request_id)
        return state, state.status == "running" and not owner_alive(state.owner)

    # -------------------------------------------------------------- worker
    async def _worker(self) -> None:
        while True:
            try:
                await self._work_once()
            except Exception:
                # The queue itself failed (disk, SQLite): keep serving, try again soon.
                log.exception("queue worker error; retrying",
                              retry_in_seconds=_ERROR_BACKOFF_SECONDS)
                await anyio.sleep(_ERROR_BACKOFF_SECONDS)

    async def _release(self, ids: list[int]) -> None:
        """Give requests back to the queue; those it cannot take now (SQLite locked for
        long, a full disk) are given back before the next claim, not left running."""
        try:
            await anyio.to_thread.run_sync(self.queue.release, ids)
        except Exception as exc:
            self._unreleased = sorted(set(ids))
            log.warning("could not give requests back to the queue; trying again",
                        ids=self._unreleased, error=str(exc)[:200])
        else:
            self._unreleased = []

    async def _work_once(self) -> int:
        """Claim what is pending and serve it; returns how many syncs failed."""
        if self._unreleased:
            await self._release(self._unreleased)
        wake = self._wake
        if await anyio.to_thread.run_sync(self.queue.pending_count) == 0:
            # Bounded: requests another process queued or left behind are found too,
            # and a failed session end is retried when it is due.
            retry_in = await anyio.to_thread.run_sync(self.queue.seconds_to_next_retry)
            nap = _SWEEP_SECONDS if retry_in is None else min(_SWEEP_SECONDS, retry_in)
            with anyio.move_on_after(nap):
                await wake.wait()
        self._wake = anyio.Event()
        return (await self._serve_claimed())[1]

    async def _serve_claimed(self, *, even_if_not_due: bool = False) -> tuple[int, int]:
        """Claim everything pending, one sync per (method, fallback): (requests, failures)."""
        requests = await anyio.to_thread.run_sync(
            lambda: self.queue.claim_pending(even_if_not_due=even_if_not_due))
        groups: dict[tuple[str, bool | None], list[Request]] = {}
        for request in requests:
            groups.setdefault((request.method, request.enable_fallback), []).append(request)
        failures = 0
        for key, group in groups.items():
            failures += not (await self._serve(key, group)).get("success")
        return len(requests), failures

    async def drain(self) -> int:
        """Serve every pending request once, then return (``akosha-sync drain``).

        Asked to run the queue, it runs it now: failed session ends waiting for their
        retry are tried at once (only once: those that fail again wait as before).
        Returns the number of failed syncs.
        """
        self._loop_thread = threading.get_ident()
        failures = 0
        first = True
        while True:
            served, failed = await self._serve_claimed(even_if_not_due=first)
            first = False
            if not served:
                return failures
            failures += failed

    def _sources(self) -> tuple[SourceFingerprint | None, ...]:
        return tuple(fingerprint(p) for p in self.config.database_paths.values())

    def _method(self, method: str) -> str:
        return self.config.force_method if method == UNSET else method

    def _failure(self, method: str, error: str, *, trigger: str) -> dict[str, Any]:
        result = SyncResult(method=self._method(method), success=False, error=error).to_dict()
        result["triggered_by"] = trigger
        return result

    async def _serve(
        self, key: tuple[str, bool | None], requests: list[Request]
    ) -> dict[str, Any]:
        """Run one sync for ``requests`` (or skip it), record it and answer the waiters."""
        ids = [r.id for r in requests]
        triggers = [r.trigger for r in requests]
        trigger = triggers[0] if len(set(triggers)) == 1 else ",".join(sorted(set(triggers)))
        started = time.time()
        recorded = False
        try:
            try:
                result, started = await self._sync(key, requests, trigger)
            except Exception as exc:
                # Not a sync failure run_sync knows (the state folder, DuckDB, SQLite,
                # a bug): this sync's failed result, not the end of the daemon.
                log.exception("sync failed with an unexpected error", trigger=trigger)
                result = self._failure(
                    key[0], f"unexpected error: {type(exc).__name__}: {exc}; "
                    f"see the log at {self.config.log_path}", trigger=trigger)
            try:
                # Shielded: a finished upload is recorded even when shutdown cancels us.
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: self.queue.finish(
                        ids, result, triggers=triggers, started_at=started,
                        finished_at=time.time(),
                    ))
                recorded = True
                if (not result.get("success") and not result.get("manifest_key")
                        and RETRIED_TRIGGERS.intersection(triggers)):
                    log.warning("the session end stays queued and is retried",
                                trigger=trigger, error=result.get("error"),
                                retry_in_seconds=await anyio.to_thread.run_sync(
                                    self.queue.seconds_to_next_retry))
            except Exception:
                log.exception("could not record the sync in the queue; its requests stay "
                              "queued", trigger=trigger)
        finally:
            if not recorded:
                with anyio.CancelScope(shield=True):
                    await self._release([*self._unreleased, *ids])
            self._idle.set()
        self._notify(ids, result)
        # Retention (issue 7): after the waiters have their result; a no-op when unset.
        await apply_configured_retention(self.config, result)
        return result

    async def _sync(
        self, key: tuple[str, bool | None], requests: list[Request], trigger: str
    ) -> tuple[dict[str, Any], float]:
        """The sync's result and when it started (or the skip of an unneeded one)."""
        previous = self._last_sync.get(key)
        sources = self._sources()
        if (
            previous is not None
            and previous[2] == sources
            and all(previous[0] <= r.received_at <= previous[1] for r in requests)
            and (last := self.queue.last_result()) is not None
            and last.get("success")
        ):
            # They arrived while that sync ran, and it covered the current data. A request
            # made after it ended runs (an unchanged sync is cheap, and it checks the
            # bucket: the upload answered last time may have been deleted since).
            return {**last, "skipped": "databases unchanged since the sync it waited for",
                    "triggered_by": requests[0].trigger}, time.time()
        started = time.time()
        self._last_sync.pop(key, None)
        self._idle = anyio.Event()
        self.current = {
            "phase": "starting",
            "bytes_done": 0,
            "bytes_total": 0,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "triggers": sorted({r.trigger for r in requests}),
            "method": self._method(key[0]),
            "requests": len(requests),
        }
        ids = [r.id for r in requests]
        try:
            result = await run_sync(
                self.config,
                method=None if key[0] == UNSET else key[0],
                enable_fallback=key[1],
                trigger=trigger,
                progress=lambda phase, done, total: self._progress(ids, phase, done, total),
            )
        finally:
            self.current = None  # _serve sets _idle once the sync is recorded
        if result.get("success"):
            self._last_sync[key] = (started, time.time(), sources)
        return result, started

    def _notify(self, ids: list[int], result: dict[str, Any]) -> None:
        for request_id in ids:
            event = self._done.get(request_id)
            if event is not None:
                # Kept for the waiter even when the history write failed.
                self._results[request_id] = result
                while len(self._results) > _KEEP_RESULTS:
                    self._results.pop(next(iter(self._results)))
                event.set()

    def _progress(self, ids: list[int], phase: str, done: int, total: int) -> None:
        if threading.get_ident() != self._loop_thread:
            anyio.from_thread.run_sync(self._progress, ids, phase, done, total)
            return
        if self.current is not None:
            self.current.update(phase=phase, bytes_done=done, bytes_total=total)
        for request_id in ids:
            listener = self._listeners.get(request_id)
            if listener is not None:
                listener(phase, done, total)

    # -------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        status = local_status(self.config)
        status.update(
            running=dict(self.current) if self.current else None,
            queued=self.queue.pending(),
            last_result=self.queue.last_result(),
            history=self.queue.history(10),
            daemon={
                "pid": os.getpid(),
                "transport": self.transport,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started_at)),
                "log_file": str(self.config.log_path),
                "state_dir": str(self.config.state_path),
            },
        )
        return status

    # ---------------------------------------------------- periodic (issue 10)
    #: The clock seam: seconds per configured minute (tests shorten it).
    seconds_per_minute: float = 60.0
    #: How many periods have been checked (for status and tests).
    periodic_checks: int = 0

    async def _sync_periodically(self) -> None:
        """``sync_interval_minutes``: sync on that period while the databases change.

        A failed sync leaves the baseline as it was, so the next period tries again.
        """
        minutes = self.config.sync_interval_minutes
        if minutes <= 0:
            return
        baseline = await anyio.to_thread.run_sync(self._sources)
        while True:
            await anyio.sleep(minutes * self.seconds_per_minute)
            current = await anyio.to_thread.run_sync(self._sources)
            self.periodic_checks += 1
            if current == baseline:
                continue
            try:
                result = await self.wait_for(await self.submit("interval"))
            except Exception as exc:  # never let the timer end the daemon
                log.warning("periodic sync failed", error=str(exc))
                continue
            if result.get("success"):
                baseline = current
