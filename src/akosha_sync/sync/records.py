"""Memory records read from a snapshot, in the shapes Akosha accepts.

Both ways of reaching Akosha send the same records (conversations and reflections
from the reflection database, entities from the knowledge graph): the cloud method
writes them into ``memories.json`` (Akosha's ingestion file), the HTTP method passes
them to ``batch_store_memories``. DuckDB renders each record as JSON itself (fast, and the
embedding rounded to 7 decimals keeps a 384-float record near 4 KB).

Which records were already delivered is kept per *channel* (one per target) in a
small DuckDB file in the state folder, so only new records are sent and progress
advances only for records the target accepted.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec
import structlog

from akosha_sync._fs import atomic_write, private_dir, private_file, set_aside
from akosha_sync.repository.source import ROOMY_MEMORY_LIMIT, attach_read_only, sql_str

if TYPE_CHECKING:
    # DuckDB (~0.1 s, ~30 MB) is imported by the functions that open a connection:
    # an unchanged re-sync never needs it.
    import duckdb

__all__ = [
    "GRAPH_KINDS",
    "KINDS",
    "NO_EMBEDDING_REASON",
    "PROGRESS_LOCK",
    "REFLECTION_KINDS",
    "MemoriesExport",
    "MemoriesWriter",
    "RecordKind",
    "RecordShape",
    "count_undeliverable",
    "forget_delivered",
    "iter_record_batches",
    "iter_records",
    "load_undeliverable",
    "mark_delivered",
    "memory_id",
    "move_channel",
    "open_progress",
    "open_snapshot",
    "save_undeliverable",
]

log = structlog.get_logger("akosha_sync.records")

RecordShape = Literal["ingest", "mcp"]

_SLICE_ROWS = 500
# Slices rendered side by side (DuckDB renders without the GIL): one per core here.
_RENDER_THREADS = max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class RecordKind:
    """How one kind of record is read: candidate tables, text, useful columns."""

    kind: str
    tables: tuple[str, ...]
    text: str  # SQL expression giving the memory text
    columns: tuple[str, ...]  # copied into metadata when the table has them
    timestamp_columns: tuple[str, ...] = ("timestamp", "created_at")


CONVERSATION = RecordKind(
    kind="conversation",
    tables=("conversations_v2", "conversations"),
    text="content",
    columns=(
        "category", "subcategory", "project", "namespace", "session_id", "user_id",
        "source_type", "importance_score", "memory_tier", "turn_parent_id", "causal_parent_id",
    ),
)
REFLECTION = RecordKind(
    kind="reflection",
    tables=("reflections_v2", "reflections"),
    text="content",
    columns=(
        "category", "subcategory", "project", "namespace", "tags", "insight_type",
        "importance_score", "confidence_score", "memory_tier",
    ),
)
ENTITY = RecordKind(
    kind="entity",
    tables=("kg_entities",),
    text=(
        "name || ' (' || entity_type || ')' "
        "|| coalesce(': ' || array_to_string(observations, '; '), '')"
    ),
    columns=("name", "entity_type", "observations"),
    timestamp_columns=("created_at", "updated_at"),
)
KINDS = {k.kind: k for k in (CONVERSATION, REFLECTION, ENTITY)}
# Which kinds each database holds, in sending order.
REFLECTION_KINDS: tuple[str, ...] = ("conversation", "reflection")
GRAPH_KINDS: tuple[str, ...] = ("entity",)
NO_EMBEDDING_REASON = (
    "rows without an embedding: Akosha requires a 384-float embedding for every memory"
)
_UNDELIVERABLE_FILE = "undeliverable.json"
# DuckDB attaches a database file once per process: two cloud syncs of one process
# (without the sync lock, e.g. as a library) take turns with the progress store.
PROGRESS_LOCK = threading.Lock()

_PROGRESS_SCHEMA = """
CREATE TABLE IF NOT EXISTS progress.delivered (
    channel VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    id VARCHAR NOT NULL,
    PRIMARY KEY (channel, kind, id)
)
"""


def memory_id(system_id: str, kind: str, record_id: str) -> str:
    """Akosha's memory ids are global across machines: prefix system and kind."""
    return f"{system_id}:{kind}:{record_id}"


def open_snapshot(snapshot: Path, progress_db: Path) -> duckdb.DuckDBPyConnection:
    """A connection reading ``snapshot`` (read-only: its WAL is replayed in memory and
    the files stay byte-identical) with the delivered-ids store attached."""
    # A memory cap (spilling next to the snapshot when needed) keeps an export of any
    # size bounded; without it DuckDB caches the whole table and every document.
    con = attach_read_only(snapshot, snapshot.parent / ".duckdb-tmp")
    try:
        open_progress(con, progress_db)
    except BaseException:
        con.close()
        raise
    return con


def open_progress(con: duckdb.DuckDBPyConnection, progress_db: Path) -> None:
    """Attach the delivered-ids store to a connection as ``progress``.

    A damaged store (truncated, not DuckDB) is moved aside with a warning and
    recreated: only delivery progress is lost, so records are sent again.
    """
    import duckdb

    private_dir(progress_db.parent)
    try:
        _attach_progress(con, progress_db)
    except duckdb.Error as exc:
        if not _DAMAGED_DUCKDB.search(str(exc)):
            raise  # a lock held by another process, a permission: not damage
        with contextlib.suppress(duckdb.Error):
            con.execute("DETACH progress")
        moved = set_aside(progress_db, ".wal")
        log.warning(
            f"the delivered-records store {progress_db.name} is damaged and was moved "
            f"aside to {moved.name}; the delivery progress of every channel (HTTP and "
            "the cloud's memories.json) was reset: the next sync sends every record "
            "again and Akosha will answer duplicates for records it holds",
            file=str(progress_db), moved_to=str(moved), error=str(exc)[:300],
        )
        _attach_progress(con, progress_db)


# DuckDB's words for a file that is not (or no longer) a whole database.
_DAMAGED_DUCKDB = re.compile(
    r"not a valid DuckDB database|could not read enough bytes|corrupt|checksum",
    re.IGNORECASE,
)


def _attach_progress(con: duckdb.DuckDBPyConnection, progress_db: Path) -> None:
    con.execute(f"ATTACH '{sql_str(str(progress_db))}' AS progress")
    private_file(progress_db)  # DuckDB creates it with the umask's mode
    con.execute(_PROGRESS_SCHEMA)
    con.execute("SELECT count(*) FROM progress.delivered").fetchone()  # damage shows here


def _table_columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_catalog = current_database() "
        "AND table_name = ?",
        [table],
    ).fetchall()
    return {r[0] for r in rows}


def _find_table(con: duckdb.DuckDBPyConnection, kind: RecordKind) -> tuple[str, set[str]] | None:
    """The first candidate table present, fully qualified (cursors do not inherit USE)."""
    row = con.execute("SELECT current_database()").fetchone()
    catalog = str(row[0]) if row else "memory"
    for table in kind.tables:
        columns = _table_columns(con, table)
        if columns:
            return f'"{catalog}".main."{table}"', columns
    return None


def _select_sql(
    kind: RecordKind, table: str, columns: set[str], shape: RecordShape, undelivered: bool
) -> str:
    stamp = next((c for c in kind.timestamp_columns if c in columns), None)
    ts = (
        f"strftime(coalesce(t.{stamp}, now()::TIMESTAMP), '%Y-%m-%dT%H:%M:%S.%fZ')"
        if stamp
        else "strftime(now()::TIMESTAMP, '%Y-%m-%dT%H:%M:%S.%fZ')"
    )
    meta = [
        "source: $system_id",
        f"record_type: '{kind.kind}'",
        f"type: '{kind.kind}'",  # of all our keys, Akosha keeps source, original_id and type
        "original_id: t.id",
        f"created_at: {ts}",
        f"source_table: '{table.rsplit('.', 1)[-1].strip(chr(34))}'",
    ]
    meta += [f"{c}: t.{c}" for c in kind.columns if c in columns]
    embedding = "list_transform(t.embedding, lambda x: round(x::DOUBLE, 7))"
    mid = f"$system_id || ':{kind.kind}:' || t.id"
    if shape == "ingest":
        body = (
            f"id: {mid}, content: {kind.text}, embedding: {embedding}, "
            f"timestamp: {ts}, metadata: {{{', '.join(meta)}}}"
        )
    else:
        body = (
            f"memory_id: {mid}, text: {kind.text}, embedding: {embedding}, "
            f"metadata: {{{', '.join(meta)}}}"
        )
    where = "TRUE"
    if undelivered:
        where += (
            " AND NOT EXISTS (SELECT 1 FROM progress.delivered d WHERE d.channel = $channel"
            f" AND d.kind = '{kind.kind}' AND d.id = t.id)"
        )
    # Rows without an embedding give a NULL document (skipped by the reader) rather than
    # being filtered in WHERE: DuckDB evaluates "embedding IS NOT NULL" there over the
    # whole row group, not the rowid slice (60-80 ms a slice of kg_entities, 77x).
    # No ORDER BY: Akosha needs none, and sorting makes DuckDB hold every document.
    return (
        f"SELECT t.id, CASE WHEN t.embedding IS NULL THEN NULL "
        f"ELSE to_json({{{body}}})::VARCHAR END FROM {table} t WHERE {where}"
    )


def iter_records(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    *,
    system_id: str,
    shape: RecordShape,
    channel: str | None = None,
    batch: int = _SLICE_ROWS,
) -> Iterator[tuple[str, str]]:
    """Yield ``(original id, record JSON)`` for records with an embedding.

    With ``channel``, only those not yet delivered on it (``open_progress`` first).
    """
    for docs in iter_record_batches(
        con, kind, system_id=system_id, shape=shape, channel=channel, batch=batch
    ):
        yield from docs


def iter_record_batches(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    *,
    system_id: str,
    shape: RecordShape,
    channel: str | None = None,
    batch: int = _SLICE_ROWS,
) -> Iterator[list[tuple[str, str]]]:
    """:func:`iter_records` a rowid slice at a time (fewer, larger writes)."""
    spec = KINDS[kind]
    found = _find_table(con, spec)
    if found is None:
        return
    table, columns = found
    if "embedding" not in columns:
        return
    sql = _select_sql(spec, table, columns, shape, undelivered=channel is not None)
    # The Python API materialises a whole result: read by rowid slices instead, so
    # only a few slices of documents exist at a time.
    sql += " AND t.rowid >= $low AND t.rowid < $high"
    params: dict[str, object] = {"system_id": system_id}
    if channel is not None:
        params["channel"] = channel
    cursor = con.cursor()
    try:
        if channel is None:
            row = cursor.execute(f"SELECT max(rowid) FROM {table}").fetchall()
            last = -1 if not row or row[0][0] is None else int(row[0][0])
            starts: Sequence[int] = range(0, last + 1, batch)
        else:
            # Only the slices that hold an undelivered record: after the first sync that
            # is one or two, and one anti-join here spares one per slice (hundreds).
            rows = cursor.execute(
                f"SELECT DISTINCT t.rowid // {int(batch)} FROM {table} t "
                "WHERE t.embedding IS NOT NULL AND NOT EXISTS (SELECT 1 FROM "
                "progress.delivered d WHERE d.channel = $channel "
                f"AND d.kind = '{spec.kind}' AND d.id = t.id) ORDER BY 1",
                {"channel": channel},
            ).fetchall()
            starts = [int(r[0]) * batch for r in rows]
    finally:
        cursor.close()
    yield from _render_slices(con, sql, params, starts, batch)


def _render_slices(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: dict[str, object],
    starts: Sequence[int],
    batch: int,
) -> Iterator[list[tuple[str, str]]]:
    """Run ``sql`` per rowid slice in worker threads, yielding the slices in order.

    DuckDB renders the JSON without holding the GIL, so slices render side by side on
    every core while the caller writes the previous ones; at most a few slices are in
    flight, which keeps memory bounded.
    """
    local = threading.local()
    cursors: list[duckdb.DuckDBPyConnection] = []
    guard = threading.Lock()
    roomy = threading.Event()  # the cap was raised once already

    def render(low: int, high: int | None = None) -> list[tuple[str, str]]:
        import duckdb

        high = low + batch if high is None else high
        cursor = getattr(local, "cursor", None)
        if cursor is None:
            cursor = local.cursor = con.cursor()  # one per thread: cursors are not shared
            with guard:
                cursors.append(cursor)
        tried_roomy = roomy.is_set()
        try:
            cursor.execute(sql, {**params, "low": low, "high": high})
            rows = cursor.fetchall()
        except duckdb.OutOfMemoryException:
            # Unusually large records (long conversations) under the memory cap: render
            # the slice in halves rather than fail the sync; a record that does not fit
            # alone gets one more try under a raised cap (for the rest of the export).
            if high - low <= 1:
                if tried_roomy:
                    raise
                with guard:
                    if not roomy.is_set():
                        cursor.execute(f"SET memory_limit = '{ROOMY_MEMORY_LIMIT}'")
                        roomy.set()
                        log.info("one record needs more memory than the export's cap; "
                                 "raised it", memory_limit=ROOMY_MEMORY_LIMIT, rowid=low)
                return render(low, high)
            middle = (low + high) // 2
            return render(low, middle) + render(middle, high)
        return [(str(record_id), str(doc)) for record_id, doc in rows if doc is not None]

    pending: deque[Future[list[tuple[str, str]]]] = deque()
    lows = iter(starts)
    try:
        with ThreadPoolExecutor(_RENDER_THREADS, thread_name_prefix="akosha-render") as pool:
            for low in itertools.islice(lows, _RENDER_THREADS + 1):
                pending.append(pool.submit(render, low))
            while pending:
                docs = pending.popleft().result()
                following = next(lows, None)
                if following is not None:
                    pending.append(pool.submit(render, following))
                yield docs
    finally:
        for future in pending:
            future.cancel()
        for cursor in cursors:
            cursor.close()


def count_undeliverable(
    con: duckdb.DuckDBPyConnection, kind: str, *, channel: str | None = None
) -> int:
    """Records Akosha cannot take because they carry no embedding."""
    spec = KINDS[kind]
    found = _find_table(con, spec)
    if found is None:
        return 0
    table, columns = found
    if "embedding" not in columns:
        row = con.execute(f'SELECT count(*) FROM {table}').fetchone()
        return int(row[0]) if row else 0
    sql = f'SELECT count(*) FROM {table} t WHERE t.embedding IS NULL'
    params: list[str] = []
    if channel is not None:
        sql += (
            " AND NOT EXISTS (SELECT 1 FROM progress.delivered d WHERE d.channel = ?"
            f" AND d.kind = '{spec.kind}' AND d.id = t.id)"
        )
        params.append(channel)
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def mark_delivered(
    con: duckdb.DuckDBPyConnection, channel: str, kind: str, ids: Sequence[str]
) -> None:
    """Record that these ids reached the channel's target."""
    if not ids:
        return
    con.execute(
        "INSERT OR IGNORE INTO progress.delivered SELECT ?, ?, unnest(?::VARCHAR[])",
        [channel, kind, list(ids)],
    )


@contextlib.contextmanager
def _delivered_store(progress_db: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection with the delivered-ids store attached as ``progress``."""
    import duckdb

    con = duckdb.connect()
    try:
        open_progress(con, progress_db)
        yield con
    finally:
        con.close()


def _delivered_on(con: duckdb.DuckDBPyConnection, channel: str) -> int:
    row = con.execute(
        "SELECT count(*) FROM progress.delivered WHERE channel = ?", [channel]
    ).fetchone()
    return int(row[0]) if row else 0


def forget_delivered(progress_db: Path, channel: str) -> int:
    """Forget what was delivered on a channel, so the next sync sends everything again
    (for a target that lost its data); returns how many records were forgotten."""
    if not progress_db.exists():
        return 0
    with _delivered_store(progress_db) as con:
        forgotten = _delivered_on(con, channel)
        con.execute("DELETE FROM progress.delivered WHERE channel = ?", [channel])
        return forgotten


def move_channel(progress_db: Path, old: str, new: str) -> int:
    """What was delivered on ``old`` is now known as delivered on ``new`` (one target
    under a new name, not a new target), in one transaction; a second call finds
    nothing to move. Returns how many records moved."""
    if old == new or not progress_db.exists():
        return 0
    with _delivered_store(progress_db) as con:
        moved = _delivered_on(con, old)
        if moved:
            con.execute("BEGIN")
            con.execute(
                "INSERT OR IGNORE INTO progress.delivered "
                "SELECT ?, kind, id FROM progress.delivered WHERE channel = ?", [new, old]
            )
            con.execute("DELETE FROM progress.delivered WHERE channel = ?", [old])
            con.execute("COMMIT")
        return moved


class MemoriesExport(msgspec.Struct, frozen=True):
    """What a :class:`MemoriesWriter` wrote, per kind, and what it could not."""

    written: dict[str, list[str]]  # original ids
    undeliverable: dict[str, int]  # records without an embedding (only kinds with some)


_OPEN = b'{"conversations": ['
_CLOSE = b"]}\n"
_CHUNK_BYTES = 1024 * 1024


class MemoriesWriter:
    """Akosha's ``{"conversations": [...]}`` with every undelivered record, rendered
    snapshot by snapshot into ``sink`` in chunks of about 1 MiB (bounded memory).

    Akosha's worker reads only the ``conversations`` list, so every kind goes there
    (conversations, reflections, entities: what the HTTP method delivers), each
    marked by ``metadata.record_type`` / ``metadata.type``. :meth:`add` and
    :meth:`close` block (call them from a worker thread): ``sink`` may block too,
    which is how a slow upload holds the rendering back.
    """

    def __init__(
        self,
        sink: Callable[[bytearray], None],
        *,
        progress_db: Path,
        system_id: str,
        channel: str | None,
    ) -> None:
        self._sink = sink
        self._progress_db = progress_db
        self._system_id = system_id
        self._channel = channel
        self._buffer = bytearray(_OPEN)
        self._first = True
        self.written: dict[str, list[str]] = {}
        self.undeliverable: dict[str, int] = {}

    def add(
        self, snapshot: Path | duckdb.DuckDBPyConnection, kinds: Sequence[str]
    ) -> None:
        """Append the undelivered records of ``kinds`` from one snapshot.

        ``snapshot`` is a database file (opened and closed here) or an open connection
        whose schema is the database (the blocks layout's held source: used as it is
        and left open). DuckDB attaches the progress store once per process, hence
        the lock.
        """
        with PROGRESS_LOCK:
            if isinstance(snapshot, Path):
                con = open_snapshot(snapshot, self._progress_db)
            else:
                con = snapshot
                open_progress(con, self._progress_db)
            try:
                for kind in kinds:
                    self._add_kind(con, kind)
            finally:
                if isinstance(snapshot, Path):
                    con.close()
                else:
                    con.execute("DETACH progress")

    def _add_kind(self, con: duckdb.DuckDBPyConnection, kind: str) -> None:
        ids = self.written.setdefault(kind, [])
        for docs in iter_record_batches(
            con, kind, system_id=self._system_id, shape="ingest", channel=self._channel
        ):
            # Each document straight into the chunk: no slice-sized joins or copies
            # (a first export renders ~2x the databases' size).
            buffer = self._buffer
            for record_id, doc in docs:
                if not self._first:
                    buffer += b",\n"
                self._first = False
                buffer += doc.encode()
                ids.append(record_id)
            if len(self._buffer) >= _CHUNK_BYTES:
                self._flush()
        if n := count_undeliverable(con, kind, channel=self._channel):
            self.undeliverable[kind] = n

    def _flush(self) -> None:
        data, self._buffer = self._buffer, bytearray()
        self._sink(data)  # handed over, not copied: the next chunk is a new buffer

    def close(self) -> MemoriesExport:
        """End the document (the last chunk goes to ``sink``); what was written."""
        self._buffer += _CLOSE
        self._flush()
        return MemoriesExport(written=self.written, undeliverable=self.undeliverable)


def save_undeliverable(state_dir: Path, method: str, by_kind: dict[str, int]) -> None:
    """Remember, per method, the records the last sync could not deliver (no embedding),
    so ``status`` can show them without opening the live databases."""
    import json
    from datetime import UTC, datetime

    path = state_dir / _UNDELIVERABLE_FILE
    known = load_undeliverable(state_dir)
    known[method] = {
        "count": sum(by_kind.values()),
        "by_kind": {k: n for k, n in by_kind.items() if n},
        "reason": NO_EMBEDDING_REASON,
        "at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }
    private_dir(path.parent)
    atomic_write(path, json.dumps(known, indent=2, sort_keys=True) + "\n")


def load_undeliverable(state_dir: Path) -> dict[str, dict[str, object]]:
    """What ``save_undeliverable`` wrote; empty when nothing (readable) is there."""
    import json

    try:
        data = json.loads((state_dir / _UNDELIVERABLE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
