"""The daemon core: a process-level task group that runs syncs from the durable queue.

Requests from tools, hooks and the CLI land in the queue first. One worker claims
everything pending at once, so any number of triggers that arrive while a sync runs
collapse into one follow-up sync; and a follow-up is skipped when the databases did
not change since the sync it waited for started. Only one upload runs at a time
(and the state-folder lock keeps a CLI run out too).

On shutdown a running sync gets ``grace_seconds`` to finish; otherwise it is
cancelled, nothing is committed (the manifest is written last) and its requests
return to pending for the next start.
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
from akosha_sync.server.queue import JobQueue, Request
from akosha_sync.sync.runner import run_sync
from akosha_sync.sync.snapshot import SourceFingerprint, fingerprint
from akosha_sync.sync.status import local_status

__all__ = ["HookPayloadError", "SyncDaemon", "validate_hook_payload"]

log = structlog.get_logger("akosha_sync.daemon")

ProgressListener = Callable[[str, int, int], None]


class SyncDaemon:
    """Owns the task group; everything long-running happens inside it."""

    def __init__(self, config: AkoshaSyncConfig, *, grace_seconds: float = 10.0) -> None:
        self.config = config
        self.grace_seconds = grace_seconds
        self.queue = JobQueue(config.state_path)
        self.started_at = time.time()
        self.transport = ""
        self.current: dict[str, Any] | None = None
        self._wake = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        self._done: dict[int, anyio.Event] = {}
        self._listeners: dict[int, ProgressListener] = {}
        self._task_group: anyio.abc.TaskGroup | None = None
        self._loop_thread = threading.get_ident()
        # Sources as they were when the last sync started, per (method, fallback).
        self._last_sync: dict[tuple[str, bool | None], tuple[float, Any]] = {}

    # ----------------------------------------------------------- lifecycle
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SyncDaemon]:
        """Run the worker for the duration of the block; shut down gracefully after."""
        self._loop_thread = threading.get_ident()
        recovered = self.queue.recover()
        if recovered:
            log.info("resuming requests left by an earlier run", count=recovered)
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            tg.start_soon(self._worker)
            try:
                yield self
            finally:
                with anyio.CancelScope(shield=True):
                    await self._shutdown(tg)

    async def _shutdown(self, tg: anyio.abc.TaskGroup) -> None:
        if not self._idle.is_set():
            log.info("waiting for the running sync to finish", grace_seconds=self.grace_seconds)
            with anyio.move_on_after(self.grace_seconds):
                await self._idle.wait()
            if not self._idle.is_set():
                log.warning("sync cancelled at shutdown; its requests stay queued")
        tg.cancel_scope.cancel()

    # -------------------------------------------------------------- intake
    async def submit(
        self,
        trigger: str,
        *,
        method: str = "auto",
        enable_fallback: bool | None = None,
        payload: dict[str, Any] | None = None,
    ) -> int:
        """Record a request durably and wake the worker; returns the request id.

        The write (an fsync) runs in a worker thread so that a busy disk during an
        upload does not stall every other request on the event loop.
        """
        request_id = await anyio.to_thread.run_sync(
            lambda: self.queue.enqueue(
                trigger, method=method, enable_fallback=enable_fallback, payload=payload
            )
        )
        self._done.setdefault(request_id, anyio.Event())
        self._wake.set()
        log.info("sync requested", trigger=trigger, request_id=request_id, method=method)
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
        self, request_id: int, progress: ProgressListener | None = None
    ) -> dict[str, Any]:
        """Wait until the sync serving ``request_id`` is done and return its result."""
        if progress is not None:
            self._listeners[request_id] = progress
        try:
            # The event first, then the check: a sync finishing in between still sets it.
            done = self._done.setdefault(request_id, anyio.Event())
            result = self.queue.result_of(request_id)
            if result is None:
                await done.wait()
                result = self.queue.result_of(request_id)
        finally:
            self._listeners.pop(request_id, None)
            self._done.pop(request_id, None)
        if result is None:  # pragma: no cover - only if the queue file was removed
            raise RuntimeError(f"request {request_id} finished without a recorded result")
        return result

    # -------------------------------------------------------------- worker
    async def _worker(self) -> None:
        while True:
            wake = self._wake
            if await anyio.to_thread.run_sync(self.queue.pending_count) == 0:
                await wake.wait()
            self._wake = anyio.Event()
            requests = await anyio.to_thread.run_sync(self.queue.claim_pending)
            groups: dict[tuple[str, bool | None], list[Request]] = {}
            for request in requests:
                groups.setdefault((request.method, request.enable_fallback), []).append(request)
            for key, group in groups.items():
                await self._serve(key, group)

    def _sources(self) -> tuple[SourceFingerprint | None, ...]:
        return tuple(fingerprint(p) for p in self.config.database_paths.values())

    async def _serve(self, key: tuple[str, bool | None], requests: list[Request]) -> None:
        ids = [r.id for r in requests]
        triggers = [r.trigger for r in requests]
        previous = self._last_sync.get(key)
        sources = self._sources()
        if (
            previous is not None
            and previous[1] == sources
            and all(r.received_at >= previous[0] for r in requests)
            and (last := self.queue.last_result()) is not None
            and last.get("success")
        ):
            # They waited for a sync that already covered the current data.
            result = {**last, "skipped": "databases unchanged since the sync it waited for",
                      "triggered_by": triggers[0]}
            now = time.time()
            self.queue.finish(ids, result, triggers=triggers, started_at=now, finished_at=now)
            self._notify(ids)
            return
        started = time.time()
        self._last_sync.pop(key, None)
        self._idle = anyio.Event()
        self.current = {
            "phase": "starting",
            "bytes_done": 0,
            "bytes_total": 0,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "triggers": sorted(set(triggers)),
            "method": key[0],
            "requests": len(ids),
        }
        finished = False
        try:
            result = await run_sync(
                self.config,
                method=key[0],
                enable_fallback=key[1],
                trigger=triggers[0] if len(set(triggers)) == 1 else ",".join(sorted(set(triggers))),
                progress=lambda phase, done, total: self._progress(ids, phase, done, total),
            )
            self.queue.finish(
                ids, result, triggers=triggers, started_at=started, finished_at=time.time()
            )
            finished = True
            if result.get("success"):
                self._last_sync[key] = (started, sources)
        finally:
            if not finished:
                self.queue.release(ids)
            self.current = None
            self._idle.set()
        self._notify(ids)
        # Retention (issue 7): after the waiters have their result; a no-op when unset.
        await apply_configured_retention(self.config, result)

    def _notify(self, ids: list[int]) -> None:
        for request_id in ids:
            event = self._done.get(request_id)
            if event is not None:
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
