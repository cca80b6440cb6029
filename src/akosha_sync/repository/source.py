"""A database and its WAL, held still while they are read once: the snapshot.

Why a snapshot taken this way never mixes two states of a database
=====================================================================

A DuckDB process that opens a database for writing takes an exclusive POSIX
(``fcntl``) lock on the database file and keeps it until it closes; a read-only open
takes a shared lock on the same file. The two conflict, and DuckDB never touches the
file or its WAL without holding one of them (it fails at once with "Could not set
lock on file" instead of waiting). So:

1. :func:`open_locked` ATTACHes the live database READ_ONLY. If that succeeds, no
   process holds it for writing, and from this moment none can open it for writing
   (their open fails on our shared lock) until we let go. A read-only open never
   writes either: DuckDB replays the WAL in memory and leaves both files as they are.
2. While the lock is held we open the database file and the WAL, read every byte of
   both (hash, split, compress, upload), count the rows and export the records
   through the same connection. The bytes, the row counts and the records are all of
   the one state the files hold while locked.
3. We let go only after the last read. POSIX drops *all* of a process's locks on a
   file when *any* descriptor of it is closed, so the descriptors are closed in
   :meth:`Source.close`, after every read, never before.

When a writer holds the database (Session-Buddy is running), step 1 fails on the
lock. Then the caller falls back to the copy-and-verify snapshot of
:mod:`akosha_sync.sync.snapshot` (copy database and WAL, copy again if either changed
while copying, open the copy to prove it is a readable database) and opens that copy
with :func:`open_copy`: a private copy cannot change.

DuckDB's checkpoints are copy-on-write (blocks in use are never overwritten before
the new header is written), so even the fallback copy, verified by opening it,
holds one committed state: the header it names and the blocks that header reaches.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from akosha_sync._fs import private_dir

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "MAIN_TABLES", "MEMORY_LIMIT", "ROOMY_MEMORY_LIMIT", "LockedByWriter", "Source",
    "attach_read_only", "is_out_of_memory", "open_copy", "open_locked", "row_counts", "sql_str",
]

# The tables whose rows a manifest records (whichever exist).
MAIN_TABLES = (
    "conversations_v2", "conversations", "reflections_v2", "reflections",
    "kg_entities", "kg_relationships",
)
_CONVERSATION_TABLES = ("conversations_v2", "conversations")
# DuckDB's cache and working memory for one held database (row counts, the export):
# what RSS costs beyond it is ~20 MB. Slices that do not fit are split (sync/records).
# Measured on the bench's 250 MB dataset, default cold sync, 4 runs each: 32 MB lowers
# the peak RSS by ~30 MB (253 -> 221) but is ~10 % slower (the rowid slices of the
# export re-read the row groups they share); 24 MB also made single records not fit.
MEMORY_LIMIT = "64MB"
# What is tried once more when a database cannot be opened under MEMORY_LIMIT (its WAL
# is replayed in memory) or one record alone does not fit in it.
ROOMY_MEMORY_LIMIT = "256MB"


class LockedByWriter(Exception):
    """Another process holds the database open for writing."""


def sql_str(value: str) -> str:
    """``value`` for use inside a single-quoted SQL literal (ATTACH takes no parameter)."""
    return value.replace("'", "''")


def row_counts(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Rows of each main table present in the current schema."""
    present = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_catalog = current_database() AND table_schema = 'main'"
        ).fetchall()
    }
    counts: dict[str, int] = {}
    for table in MAIN_TABLES:
        if table in present:
            row = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


class Source:
    """A database (and WAL) that cannot change while this object is open.

    ``con`` reads the same state (schema ``src``), ``db_fd``/``wal_fd`` its bytes.
    """

    def __init__(
        self,
        path: Path,
        con: duckdb.DuckDBPyConnection,
        *,
        locked: bool,
    ) -> None:
        self.path = path
        self.con = con
        self.locked = locked  # True: the live files under our lock; False: a private copy
        self.db_fd = os.open(path, os.O_RDONLY)
        self.wal_fd: int | None = None
        wal = path.with_name(path.name + ".wal")
        with contextlib.suppress(FileNotFoundError):
            self.wal_fd = os.open(wal, os.O_RDONLY)
        self.db_size = os.fstat(self.db_fd).st_size
        self.wal_size = os.fstat(self.wal_fd).st_size if self.wal_fd is not None else 0
        self.row_counts = row_counts(con)

    @property
    def conversation_count(self) -> int:
        for table in _CONVERSATION_TABLES:
            if table in self.row_counts:
                return self.row_counts[table]
        return 0

    def close(self) -> None:
        """Let go: descriptors first (which drops the lock), then the connection."""
        for fd in (self.db_fd, self.wal_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wal_fd = None
        self.con.close()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_out_of_memory(exc: BaseException) -> bool:
    """DuckDB ran out of its memory cap (a WAL replay reports it as a failed commit)."""
    import duckdb

    return isinstance(exc, duckdb.OutOfMemoryException) or (
        isinstance(exc, duckdb.Error) and "memory limit" in str(exc).lower()
    )


def attach_read_only(path: Path, temp_dir: Path) -> duckdb.DuckDBPyConnection:
    """A connection reading ``path`` READ_ONLY as schema ``src``, under a memory cap
    (spilling into ``temp_dir``); a WAL too large to replay under the cap gets one
    more try under :data:`ROOMY_MEMORY_LIMIT`."""
    import duckdb

    private_dir(temp_dir, tighten=False)  # DuckDB spills table data here
    try:
        return _attach(path, temp_dir, MEMORY_LIMIT)
    except duckdb.Error as exc:
        if not is_out_of_memory(exc):
            raise
    return _attach(path, temp_dir, ROOMY_MEMORY_LIMIT)


def _attach(path: Path, temp_dir: Path, memory_limit: str) -> duckdb.DuckDBPyConnection:
    import duckdb

    con = duckdb.connect(config={"memory_limit": memory_limit, "temp_directory": str(temp_dir)})
    try:
        con.execute(f"ATTACH '{sql_str(str(path))}' AS src (READ_ONLY)")
        con.execute("USE src")
    except BaseException:
        con.close()
        raise
    return con


def open_locked(path: Path, temp_dir: Path) -> Source:
    """The live database under a shared lock (see the module docstring).

    Raises ``LockedByWriter`` when a writer holds it, ``FileNotFoundError`` when it
    is missing, and DuckDB's errors when it is not a readable database.
    """
    import duckdb

    if not path.exists():
        raise FileNotFoundError(path)
    try:
        con = attach_read_only(path, temp_dir)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise LockedByWriter(str(exc)) from exc
        raise
    try:
        return Source(path, con, locked=True)
    except BaseException:
        con.close()
        raise


def open_copy(path: Path, temp_dir: Path) -> Source:
    """A private, already verified copy (the fallback snapshot)."""
    con = attach_read_only(path, temp_dir)
    try:
        return Source(path, con, locked=False)
    except BaseException:
        con.close()
        raise
