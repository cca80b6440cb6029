"""The HTTP fallback: memories straight into Akosha through its MCP endpoint.

Akosha has no REST ingest route; it takes memories through the MCP tool
``batch_store_memories`` on its streamable-HTTP endpoint (``/mcp``), so this method
is a real MCP client session (the official SDK's ``Client``). One sync, in order:

1. snapshot the databases (consistent copies, WAL rows included);
2. read the records not yet delivered on this channel (Akosha URL + system id):
   conversations and reflections from the reflection database, entities from the
   knowledge graph;
3. send them in batches bounded by ``http_batch_size`` items and ~3.5 MiB of JSON
   (Akosha refuses bodies over 4 MiB), and after each answer mark delivered exactly
   the ids Akosha stored or already held (a duplicate-key refusal);
4. report everything else per kind: refused records, rows without an embedding,
   relations (Akosha 0.11 has no tool that takes them).

A connection that fails (refused, reset, timeout, 5xx) is retried with the
configured backoff from the batch that was not yet answered; batches already
answered stay delivered, so a retried or later sync never sends them again.
"""

from __future__ import annotations

import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import httpx2
import msgspec
import structlog
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import (
    CONNECTION_CLOSED,
    METHOD_NOT_FOUND,
    REQUEST_TIMEOUT,
    CallToolResult,
    TextContent,
)

from akosha_sync._fs import private_dir
from akosha_sync.config import AkoshaSyncConfig, url_identity
from akosha_sync.redact import scrub
from akosha_sync.repository.manifest import make_upload_id
from akosha_sync.repository.store import RetryPolicy
from akosha_sync.sync import records
from akosha_sync.sync.deadline import Deadline
from akosha_sync.sync.protocol import HTTPSyncError, ProgressCallback, SnapshotError, SyncResult
from akosha_sync.sync.snapshot import remove_snapshot_dir, take_snapshot
from akosha_sync.sync.state import target_id

__all__ = ["HttpSyncMethod"]

log = structlog.get_logger("akosha_sync.http")

_TOOL = "batch_store_memories"
# Akosha's own per-call limit.
_MAX_ITEMS = 1000
# Akosha answers 413 above 4 MiB; leave room for the JSON-RPC envelope and for
# small differences between DuckDB's JSON and the SDK's re-encoding.
_MAX_BATCH_BYTES = 3584 * 1024
_HEALTH_TIMEOUT_S = 1.0
# is_available() is asked right before sync(): answer both from one probe.
_HEALTH_CACHE_S = 5.0
_CONNECT_TIMEOUT_S = 5.0
# A full batch takes Akosha ~1.5 s (one insert per memory); silent this long is dead.
_CALL_TIMEOUT_S = 120.0
_MAX_REPORTED_FAILURES = 50
# Akosha 0.11: 'Constraint Error: Duplicate key "conversation_id: X" violates ...'
_DUPLICATE_MARKERS = ("duplicate key", "already exists")
_RELATIONS_TABLE = "kg_relationships"
# Which kinds each database holds, in sending order.
_REFLECTION_KINDS = ("conversation", "reflection")
_GRAPH_KINDS = ("entity",)

_SKIP_NO_EMBEDDING = (
    "rows without an embedding: Akosha requires a 384-float embedding for every memory"
)
_SKIP_RELATION = (
    "knowledge-graph relations: Akosha 0.11 has no tool that accepts relations "
    "(only memories via batch_store_memories)"
)


def _no_progress(phase: str, done: int, total: int) -> None:
    return None


# --------------------------------------------------------------------- records
@dataclass(frozen=True, slots=True)
class _Pending:
    """One memory to send, with what is needed to mark it delivered."""

    kind: str
    original_id: str
    memory_id: str
    body: dict[str, Any]
    size: int  # bytes of its JSON


class _Reader:
    """A snapshot opened with the delivered-ids store attached.

    Blocking; used from worker threads, one call at a time (DuckDB connections
    may move between threads but must not be used concurrently).
    """

    def __init__(self, snapshot: Path, progress_db: Path) -> None:
        self.con = records.open_snapshot(snapshot, progress_db)

    def batches(
        self, kinds: tuple[str, ...], *, system_id: str, channel: str, max_items: int
    ) -> Iterator[list[_Pending]]:
        for kind in kinds:
            batch: list[_Pending] = []
            size = 0
            for original_id, doc in records.iter_records(
                self.con, kind, system_id=system_id, shape="mcp", channel=channel
            ):
                body = msgspec.json.decode(doc)
                item = _Pending(kind, original_id, str(body["memory_id"]), body, len(doc.encode()))
                if batch and (len(batch) >= max_items or size + item.size > _MAX_BATCH_BYTES):
                    yield batch
                    batch, size = [], 0
                batch.append(item)
                size += item.size
            if batch:
                yield batch

    def undeliverable(self, kind: str, channel: str) -> int:
        return records.count_undeliverable(self.con, kind, channel=channel)

    def relations(self) -> int:
        # Relations never reach Akosha; count them so the result says so.
        found = self.con.execute(
            "SELECT count(*) FROM information_schema.tables "
            "WHERE table_schema = 'main' AND table_catalog = current_database() "
            "AND table_name = ?",
            [_RELATIONS_TABLE],
        ).fetchone()
        if not found or not found[0]:
            return 0
        row = self.con.execute(f'SELECT count(*) FROM "{_RELATIONS_TABLE}"').fetchone()
        return int(row[0]) if row else 0

    def mark(self, channel: str, kind: str, ids: list[str]) -> None:
        records.mark_delivered(self.con, channel, kind, ids)

    def close(self) -> None:
        self.con.close()


class _Feed:
    """Batches to send, database after database; failed batches go back in front."""

    def __init__(
        self,
        plan: list[tuple[Path, tuple[str, ...]]],
        *,
        progress_db: Path,
        system_id: str,
        channel: str,
        max_items: int,
        on_open: Callable[[_Reader, tuple[str, ...]], None],
    ) -> None:
        self._plan = list(plan)
        self._progress_db = progress_db
        self._system_id = system_id
        self._channel = channel
        self._max_items = max_items
        self._on_open = on_open
        self._queue: deque[list[_Pending]] = deque()
        self._reader: _Reader | None = None
        self._batches: Iterator[list[_Pending]] | None = None

    async def next(self) -> list[_Pending] | None:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self._reader is None or self._batches is None:
                if not self._plan:
                    return None
                path, kinds = self._plan.pop(0)
                self._reader = await anyio.to_thread.run_sync(self._open, path, kinds)
                self._batches = self._reader.batches(
                    kinds,
                    system_id=self._system_id,
                    channel=self._channel,
                    max_items=self._max_items,
                )
            batch = await anyio.to_thread.run_sync(next, self._batches, None)
            if batch is not None:
                return batch
            await self.close()

    def _open(self, path: Path, kinds: tuple[str, ...]) -> _Reader:
        reader = _Reader(path, self._progress_db)
        try:
            self._on_open(reader, kinds)
        except BaseException:
            reader.close()
            raise
        return reader

    def push_front(self, *batches: list[_Pending]) -> None:
        for batch in reversed(batches):
            self._queue.appendleft(batch)

    async def mark(self, kind: str, ids: list[str]) -> None:
        if ids:
            assert self._reader is not None  # a batch is only answered while its reader is open
            await anyio.to_thread.run_sync(self._reader.mark, self._channel, kind, ids)

    async def close(self) -> None:
        reader, self._reader, self._batches = self._reader, None, None
        if reader is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(reader.close)


# ---------------------------------------------------------------- bookkeeping
@dataclass
class _Tally:
    """Per-kind counts and the bounded list of refused records of one sync."""

    sent: dict[str, int] = field(default_factory=dict)
    stored: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    no_embedding: dict[str, int] = field(default_factory=dict)
    relations: int = 0
    bytes_sent: int = 0
    calls: int = 0
    wanted: int = 0  # databases asked for
    read: int = 0  # databases snapshotted and read
    conversations_total: int = 0  # in the reflection snapshot, delivered or not
    missing: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @staticmethod
    def add(counts: dict[str, int], kind: str, n: int) -> None:
        if n:
            counts[kind] = counts.get(kind, 0) + n

    def refuse(self, item: _Pending, error: str) -> None:
        self.add(self.failed, item.kind, 1)
        if len(self.failures) < _MAX_REPORTED_FAILURES:
            self.failures.append(
                {"memory_id": item.memory_id, "kind": item.kind, "error": error[:500]}
            )

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def details(self) -> dict[str, Any]:
        return {
            "sent": dict(self.sent),
            "stored": dict(self.stored),
            "duplicates": dict(self.duplicates),
            "failed": dict(self.failed),
            "failures": list(self.failures),
            "failures_truncated": max(0, self.failed_total - len(self.failures)),
            "skipped": {
                "relation": {"count": self.relations, "reason": _SKIP_RELATION},
                "no_embedding": {
                    "count": sum(self.no_embedding.values()),
                    "by_kind": dict(self.no_embedding),
                    "reason": _SKIP_NO_EMBEDDING,
                },
            },
            "calls": self.calls,
        }


class _Fatal(Exception):
    """Raised inside a session; becomes ``HTTPSyncError`` outside it."""


@dataclass
class _StatusLog:
    """The HTTP status of the last POST: the SDK turns every error status into the
    same JSON-RPC error, and 413 / 5xx / 401 each need a different reaction."""

    last: int | None = None

    async def hook(self, response: httpx2.Response) -> None:
        if response.request.method == "POST":
            self.last = response.status_code


# ---------------------------------------------------------------- the method
class HttpSyncMethod:
    """Send memories to Akosha's MCP endpoint (``akosha_url``) with ``batch_store_memories``."""

    def __init__(
        self, config: AkoshaSyncConfig, *, clock: Callable[[], datetime] | None = None
    ) -> None:
        self.config = config
        self._clock = clock or (lambda: datetime.now(UTC))
        self._health: tuple[float, bool] | None = None
        self._deadline = Deadline.for_config(config)  # replaced by each sync's share

    # ------------------------------------------------------------- protocol
    def get_method_name(self) -> str:
        return "http"

    def is_available(self) -> bool:
        """True when ``GET /health`` on Akosha's host answers 200 with status ok.

        Blocking (at most ~1 s) and cached for a few seconds.
        """
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < _HEALTH_CACHE_S:
            return self._health[1]
        ok = self._probe_health()
        self._health = (time.monotonic(), ok)
        return ok

    @property
    def health_url(self) -> str:
        """``scheme://host:port/health`` of ``akosha_url`` (no credentials, no path)."""
        parts = urlsplit(self.config.akosha_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}/health"

    @property
    def target_id(self) -> str:
        """The delivery channel: what was delivered to this Akosha for this system
        (its URL in one spelling, without credentials: :func:`url_identity`)."""
        c = self.config
        return target_id("http", url_identity(c.akosha_url), c.system_id_resolved)

    @property
    def _spelled_target_id(self) -> str:
        """The channel's name before URLs were normalized: the URL as written."""
        c = self.config
        return target_id("http", c.akosha_url.rstrip("/"), c.system_id_resolved)

    def _adopt_spelled_channel(self, progress_db: Path) -> None:
        """What an earlier version delivered under the URL as written counts for the
        channel now (else every record would be sent again); a no-op once moved."""
        with records.PROGRESS_LOCK:
            moved = records.move_channel(progress_db, self._spelled_target_id, self.target_id)
        if moved:
            log.info("delivery progress moved to the normalized Akosha URL's channel",
                     records=moved)

    def forget_delivered(self) -> int:
        """Make the next sync send every record again, e.g. after Akosha lost its data
        (0.11 keeps memories in memory only). Records it still holds come back as
        duplicates, which count as delivered. Returns how many were forgotten."""
        progress_db = self.config.state_path / "delivered.duckdb"
        forgotten = records.forget_delivered(progress_db, self.target_id)
        if self._spelled_target_id != self.target_id:  # or the next sync moves it back
            forgotten += records.forget_delivered(progress_db, self._spelled_target_id)
        log.info("delivery progress forgotten", akosha=self._shown_url, records=forgotten)
        return forgotten

    async def sync(
        self,
        upload_reflections: bool = True,
        upload_knowledge_graph: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Send the memories not yet delivered; return the seed's result dict.

        Raises ``HTTPSyncError`` when Akosha cannot be reached or keeps failing, or
        the whole sync outlasts ``upload_timeout_seconds``; batches Akosha answered
        before that stay delivered. Records Akosha refuses one by one are reported
        in ``details`` (``success`` False) and sent again next time. Keyword
        ``progress``: a ``(phase, done, total)`` callback; for ``send:<kind>`` the
        numbers are records (total 0: not known in advance).
        """
        progress: ProgressCallback = kwargs.get("progress") or _no_progress
        deadline: Deadline = kwargs.get("deadline") or Deadline.for_config(self.config)
        self._deadline = deadline
        started = time.monotonic()
        if self._url_problem():
            raise HTTPSyncError(self._url_problem())
        upload_id = make_upload_id(self.config.system_id_resolved, self._clock())
        tally = _Tally()
        try:
            with anyio.fail_after(deadline.remaining()):
                await self._sync(
                    upload_id, tally, upload_reflections, upload_knowledge_graph, progress
                )
        except TimeoutError as exc:
            raise HTTPSyncError(
                f"HTTP sync to Akosha at {self._shown_url} did not finish within its "
                f"{deadline.seconds:.0f}s share of the sync's budget (upload_timeout_seconds="
                f"{self.config.upload_timeout_seconds}s); raise it for a "
                f"large backlog or a slow link, then sync again. {self._summary(tally)}.",
                original=exc,
            ) from exc
        result = self._result(upload_id, tally)
        if tally.read:
            records.save_undeliverable(self.config.state_path, "http", tally.no_embedding)
        result.duration_seconds = round(time.monotonic() - started, 3)
        log.info(
            "sync finished",
            method="http",
            upload_id=upload_id,
            success=result.success,
            sent=tally.sent,
            stored=tally.stored,
            duplicates=tally.duplicates,
            failed=tally.failed,
            bytes_sent=tally.bytes_sent,
            duration_seconds=result.duration_seconds,
        )
        return result.to_dict()

    # ------------------------------------------------------------ the work
    async def _sync(
        self,
        upload_id: str,
        tally: _Tally,
        reflections: bool,
        knowledge_graph: bool,
        progress: ProgressCallback,
    ) -> None:
        config = self.config
        log.info("sync started", method="http", upload_id=upload_id, akosha=self._shown_url)
        root = config.state_path / "snapshots"
        private_dir(root)
        # Two syncs in one second share an upload id, never a folder.
        snapshot_dir = Path(tempfile.mkdtemp(prefix=f"http-{upload_id}-", dir=root))
        try:
            plan = await self._snapshots(
                snapshot_dir, tally, reflections, knowledge_graph, progress
            )
            if not plan:
                return
            channel = self.target_id
            progress_db = config.state_path / "delivered.duckdb"
            if self._spelled_target_id != channel:
                await anyio.to_thread.run_sync(self._adopt_spelled_channel, progress_db)

            def opened(reader: _Reader, kinds: tuple[str, ...]) -> None:
                # Runs in the worker thread that opens the snapshot.
                for kind in kinds:
                    tally.add(tally.no_embedding, kind, reader.undeliverable(kind, channel))
                if "entity" in kinds:
                    tally.relations += reader.relations()

            feed = _Feed(
                plan,
                progress_db=progress_db,
                system_id=config.system_id_resolved,
                channel=channel,
                max_items=max(1, min(config.http_batch_size, _MAX_ITEMS)),
                on_open=opened,
            )
            try:
                await self._deliver(feed, tally, progress)
            finally:
                await feed.close()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_snapshot_dir, snapshot_dir)

    async def _snapshots(
        self,
        snapshot_dir: Path,
        tally: _Tally,
        reflections: bool,
        knowledge_graph: bool,
        progress: ProgressCallback,
    ) -> list[tuple[Path, tuple[str, ...]]]:
        """Snapshot the wanted databases; what to read from each copy."""
        config = self.config
        wanted = [
            (config.reflection_db, _REFLECTION_KINDS, reflections),
            (config.knowledge_graph_db, _GRAPH_KINDS, knowledge_graph),
        ]
        plan: list[tuple[Path, tuple[str, ...]]] = []
        for name, kinds, keep in wanted:
            if not keep:
                continue
            tally.wanted += 1
            source = config.data_path / name
            progress(f"snapshot:{name}", 0, 0)
            try:
                snap = await anyio.to_thread.run_sync(take_snapshot, name, source, snapshot_dir)
            except FileNotFoundError:
                tally.missing.append(name)
                log.info("database missing; skipped", database=str(source))
                continue
            except SnapshotError as exc:
                # One unreadable database must not keep the other from syncing.
                tally.errors.append(str(exc))
                log.error("database not readable; skipped", database=str(source), error=str(exc))
                continue
            plan.append((Path(snap.path), kinds))
            tally.read += 1
            if name == config.reflection_db:
                tally.conversations_total += snap.conversation_count
        return plan

    async def _deliver(self, feed: _Feed, tally: _Tally, progress: ProgressCallback) -> None:
        """Send every batch; reconnect with backoff when the connection fails."""
        policy = RetryPolicy.from_config(self.config)
        attempt = 0  # consecutive failures; reset by every answered batch
        while True:
            batch: list[_Pending] | None = await feed.next()
            if batch is None:
                return  # nothing (left) to send: no session at all
            status = _StatusLog()
            try:
                async with self._client(status) as client:
                    while batch is not None:
                        await self._send(client, status, feed, batch, tally, progress)
                        attempt = 0
                        batch = None  # answered: a failure from here on must not resend it
                        batch = await feed.next()
                return
            except Exception as exc:
                if batch is not None:
                    feed.push_front(batch)  # not answered: it goes again
                transient, reason = _classify(exc, status.last)
                if not transient:
                    raise HTTPSyncError(self._failure(reason, tally), original=exc) from exc
                if attempt >= policy.max_retries:
                    raise HTTPSyncError(
                        self._failure(
                            f"{reason} (tried {attempt + 1} times). Check that Akosha is "
                            "running and that akosha_url points at its MCP endpoint",
                            tally,
                        ),
                        original=exc,
                    ) from exc
                delay = policy.delay(attempt)
                log.warning(
                    "akosha call failed; retrying",
                    attempt=attempt + 1,
                    max_retries=policy.max_retries,
                    retry_in=round(delay, 2),
                    cause=self._scrub(reason),
                )
                attempt += 1
                await anyio.sleep(delay)

    @asynccontextmanager
    async def _client(self, status: _StatusLog) -> AsyncIterator[Client]:
        """One MCP session with Akosha, over our own HTTP client (headers, timeouts)."""
        call_timeout = max(1.0, min(_CALL_TIMEOUT_S, self._deadline.remaining()))
        http = httpx2.AsyncClient(
            headers=self._auth_headers(),
            timeout=httpx2.Timeout(30.0, connect=_CONNECT_TIMEOUT_S, read=call_timeout),
            event_hooks={"response": [status.hook]},
        )
        async with http:
            transport = streamable_http_client(self.config.akosha_url, http_client=http)
            async with Client(transport, read_timeout_seconds=call_timeout, cache=None) as client:
                yield client

    async def _send(
        self,
        client: Client,
        status: _StatusLog,
        feed: _Feed,
        batch: list[_Pending],
        tally: _Tally,
        progress: ProgressCallback,
    ) -> None:
        """One ``batch_store_memories`` call; marks what Akosha stored or held."""
        status.last = None
        try:
            result = await client.call_tool(_TOOL, {"memories": [i.body for i in batch]})
        except MCPError:
            if status.last != 413:
                raise  # sorted out by _classify once the session is closed
            self._too_large(feed, batch, tally)
            return
        answer = _answer(result)
        tally.calls += 1
        tally.bytes_sent += sum(item.size for item in batch)  # only calls Akosha answered
        delivered = self._account(batch, answer, tally)
        kind = batch[0].kind  # a batch holds one kind
        await feed.mark(kind, delivered)
        progress(f"send:{kind}", tally.sent.get(kind, 0), 0)

    def _too_large(self, feed: _Feed, batch: list[_Pending], tally: _Tally) -> None:
        """Akosha answered 413 (our size estimate was off): split, or refuse a lone record."""
        if len(batch) > 1:
            half = len(batch) // 2
            log.warning("akosha refused a batch as too large; splitting", items=len(batch))
            feed.push_front(batch[:half], batch[half:])
            return
        tally.add(tally.sent, batch[0].kind, 1)
        tally.refuse(
            batch[0], f"too large for Akosha's 4 MiB request limit ({batch[0].size} bytes of JSON)"
        )

    def _account(self, batch: list[_Pending], answer: dict[str, Any], tally: _Tally) -> list[str]:
        """Count one answer; the original ids Akosha now holds."""
        kind = batch[0].kind
        tally.add(tally.sent, kind, len(batch))
        by_id = {item.memory_id: item for item in batch}
        errors = answer.get("errors")
        if not isinstance(errors, list):
            # A whole-batch refusal (e.g. too many items) names no ids: nothing stored.
            reason = str(answer.get("error") or f"answer without per-memory errors: {answer}")
            stored = answer.get("stored")
            for item in batch:
                tally.refuse(
                    item,
                    reason if stored in (0, None) else f"unconfirmed (Akosha said: {reason})",
                )
            return []
        refused: dict[str, str] = {}
        held: set[str] = set()
        for entry in errors:
            if not isinstance(entry, dict):
                continue
            mid = entry.get("memory_id")
            text = str(entry.get("error", ""))
            if not isinstance(mid, str) or mid not in by_id:
                continue
            if any(marker in text.lower() for marker in _DUPLICATE_MARKERS):
                held.add(mid)
            else:
                refused[mid] = text
        stored_ids = [mid for mid in by_id if mid not in held and mid not in refused]
        if answer.get("stored") != len(stored_ids):
            # The answer does not add up (e.g. an error without an id): trust only
            # duplicates; the rest goes again next time and then shows as duplicates.
            log.warning(
                "akosha answer inconsistent; not marking its stored ids",
                stored=answer.get("stored"),
                computed=len(stored_ids),
            )
            for mid in stored_ids:
                refused[mid] = f"unconfirmed: Akosha reported stored={answer.get('stored')}"
            stored_ids = []
        tally.add(tally.stored, kind, len(stored_ids))
        tally.add(tally.duplicates, kind, len(held))
        for mid, text in refused.items():
            tally.refuse(by_id[mid], text)
        return [by_id[mid].original_id for mid in (*stored_ids, *held)]

    # --------------------------------------------------------------- result
    def _result(self, upload_id: str, tally: _Tally) -> SyncResult:
        problems = list(tally.errors)
        if tally.failed_total:
            first = tally.failures[0] if tally.failures else {}
            problems.append(
                f"Akosha refused {tally.failed_total} of {sum(tally.sent.values())} memories "
                f"(first: {first.get('memory_id')}: {first.get('error')}); they were not "
                "marked delivered and will be sent again next sync"
            )
        if tally.wanted and len(tally.missing) == tally.wanted:
            problems.append(
                f"no Session-Buddy database found in {self.config.data_path} "
                f"(looked for {', '.join(self.config.database_paths)}); nothing was sent. "
                "Check data_dir."
            )
        details = tally.details()
        details["akosha_url"] = self._shown_url
        return SyncResult(
            method="http",
            success=not problems,
            files_uploaded=[],
            bytes_transferred=tally.bytes_sent,
            upload_id=upload_id,
            error=self._scrub("; ".join(problems)) or None,
            files_missing=tally.missing,
            conversation_count=tally.conversations_total,
            new_conversation_count=tally.stored.get("conversation", 0),
            details=details,
        )

    # -------------------------------------------------------------- helpers
    def _auth_headers(self) -> dict[str, str]:
        token = self.config.akosha_token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _probe_health(self) -> bool:
        if self._url_problem():
            return False
        try:
            response = httpx.get(
                self.health_url,
                headers=self._auth_headers(),
                timeout=_HEALTH_TIMEOUT_S,
                follow_redirects=False,
            )
        except httpx.HTTPError as exc:
            log.info("akosha not reachable", url=self.health_url, cause=type(exc).__name__)
            return False
        if response.status_code != 200:
            log.info("akosha health check failed", url=self.health_url, status=response.status_code)
            return False
        try:
            body = msgspec.json.decode(response.content)
        except msgspec.DecodeError:
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

    def _url_problem(self) -> str:
        parts = urlsplit(self.config.akosha_url)
        if parts.scheme in ("http", "https") and parts.hostname:
            return self.config.akosha_url_insecure()
        return (
            f"akosha_url {self._shown_url!r} is not an http(s) URL; "
            "use e.g. 'http://localhost:8682/mcp'."
        )

    @property
    def _shown_url(self) -> str:
        return str(self.config.redacted()["akosha_url"])

    def _scrub(self, text: str) -> str:
        return scrub(text, self.config)

    def _summary(self, tally: _Tally) -> str:
        delivered = sum(tally.stored.values()) + sum(tally.duplicates.values())
        if not delivered:
            return "Nothing was delivered; the next sync sends it all"
        return (
            f"{delivered} memories were delivered in {tally.calls} calls before that; they "
            "stay delivered and the next sync sends only the rest"
        )

    def _failure(self, cause: str, tally: _Tally) -> str:
        return self._scrub(
            f"HTTP sync to Akosha at {self._shown_url} failed: {cause}. {self._summary(tally)}."
        )


# ------------------------------------------------------------------ helpers
def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups; the SDK's task groups wrap them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _classify(exc: BaseException, http_status: int | None) -> tuple[bool, str]:
    """Whether another try might work, and why it failed, in words for the user.

    ``http_status`` is the status of the last POST: the SDK reports every HTTP error
    as the same JSON-RPC error, so the status is what tells 5xx from 401 from 404.
    """
    leaves = _leaves(exc)
    fatal = next((e for e in leaves if isinstance(e, _Fatal)), None)
    if fatal is not None:
        return False, str(fatal)
    reasons: list[str] = []
    for leaf in leaves:
        if isinstance(leaf, httpx2.ConnectError | httpx2.ConnectTimeout):
            reasons.append(f"could not connect ({leaf or type(leaf).__name__})")
        elif isinstance(leaf, httpx2.TimeoutException | TimeoutError):
            reasons.append("Akosha did not answer in time")
        elif isinstance(leaf, httpx2.TransportError | OSError | anyio.BrokenResourceError):
            reasons.append(f"the connection broke ({type(leaf).__name__}: {leaf})")
        elif isinstance(leaf, MCPError):
            transient, reason = _classify_mcp(leaf, http_status)
            if not transient:
                return False, reason
            reasons.append(reason)
        else:
            return False, f"{type(leaf).__name__}: {leaf}"[:600]
    return True, "; ".join(dict.fromkeys(reasons)) or type(exc).__name__


def _classify_mcp(exc: MCPError, http_status: int | None) -> tuple[bool, str]:
    if http_status in (401, 403):
        return False, (
            f"Akosha refused the credentials (HTTP {http_status}); set akosha_token to a "
            "token Akosha accepts"
        )
    if exc.code == METHOD_NOT_FOUND and http_status == 404:
        return False, (
            "no MCP endpoint answered there (HTTP 404); akosha_url must be Akosha's MCP "
            "endpoint, e.g. 'http://localhost:8682/mcp'"
        )
    if http_status is not None and (http_status >= 500 or http_status in (404, 408, 429)):
        # 404 after the handshake: Akosha restarted and no longer knows our session.
        return True, f"Akosha answered HTTP {http_status}"
    if exc.code in (CONNECTION_CLOSED, REQUEST_TIMEOUT):
        return True, f"the call failed ({exc.message})"
    shown = f" (HTTP {http_status})" if http_status else ""
    return False, f"Akosha rejected the request: {exc.message}{shown} (JSON-RPC code {exc.code})"


def _answer(result: CallToolResult) -> dict[str, Any]:
    """The tool's answer dict: ``structured_content``, else its JSON text block."""
    text = "".join(c.text for c in result.content if isinstance(c, TextContent))
    if result.is_error:
        raise _Fatal(f"{_TOOL} failed on Akosha's side: {text[:300]}")
    if isinstance(result.structured_content, dict):
        return result.structured_content
    try:
        parsed = msgspec.json.decode(text)
    except msgspec.DecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _Fatal(f"{_TOOL} answered something that is not a JSON object: {text[:200]!r}")
    return parsed
