"""Consistent snapshots of the live Session-Buddy databases.

DuckDB keeps recent changes in ``NAME.duckdb.wal`` and a writer holds the database
locked, so a snapshot is taken at the file level: copy the database and its WAL,
check that neither changed while copying (else copy again), then open the *copy*
read-only: DuckDB replays the WAL in memory, which proves the pair is a readable
database and lets us count its rows, WAL rows included. The live files are only
ever read, and the copies keep their exact bytes.

The pair is shipped as it is (database + WAL, like Litestream ships a WAL) rather
than checkpointed into one file: a checkpoint rewrites the last row group, which
for most Session-Buddy tables is the whole table, grows the file by free blocks,
costs a second of CPU and ~200 MB of memory for a 250 MB database, and never gives
the same bytes twice. Restoring is putting both files side by side; DuckDB replays
the WAL when it opens the database.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import time
from pathlib import Path

import msgspec

from akosha_sync._fs import private_dir, private_open
from akosha_sync.sync.protocol import SnapshotError

__all__ = [
    "FileStat",
    "Snapshot",
    "SourceFingerprint",
    "count_conversations",
    "fingerprint",
    "remove_snapshot_dir",
    "sweep_snapshot_dirs",
    "take_snapshot",
    "wal_path",
]

_COPY_BUFFER = 1024 * 1024


class FileStat(msgspec.Struct, frozen=True):
    size: int
    mtime_ns: int
    inode: int


class SourceFingerprint(msgspec.Struct, frozen=True):
    """What ``stat`` says of a database and its WAL; equal means 'not even re-read'."""

    db: FileStat
    wal: FileStat | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    source: str
    path: str  # the copy of the database file
    sha256: str  # of the database file's bytes (copy and source are identical)
    size: int
    wal: str | None  # the copy of the WAL, if there was one
    wal_sha256: str | None
    wal_size: int
    fingerprint: SourceFingerprint
    conversation_count: int


def wal_path(db: Path) -> Path:
    return db.with_name(db.name + ".wal")


def _stat(path: Path) -> FileStat | None:
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):  # under a file: not there either
        return None
    return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def fingerprint(db: Path) -> SourceFingerprint | None:
    """The stat fingerprint of ``db`` and its WAL, or None if the database is missing."""
    main = _stat(db)
    if main is None:
        return None
    return SourceFingerprint(db=main, wal=_stat(wal_path(db)))


def _copy_hashing(src: Path, dst: Path) -> str:
    digest = hashlib.sha256()
    with src.open("rb") as fin, private_open(dst, "wb") as fout:
        while chunk := fin.read(_COPY_BUFFER):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


def _copy_once(db: Path, dest: Path) -> tuple[SourceFingerprint, str, str | None] | None:
    """Copy database + WAL; None if either changed while being copied."""
    before = fingerprint(db)
    if before is None:
        raise FileNotFoundError(db)
    db_sha = _copy_hashing(db, dest)
    dest_wal = wal_path(dest)
    wal_sha: str | None = None
    if before.wal is not None:
        try:
            wal_sha = _copy_hashing(wal_path(db), dest_wal)
        except FileNotFoundError:
            return None  # checkpointed away under us: copy again
    else:
        dest_wal.unlink(missing_ok=True)
    if fingerprint(db) != before:
        return None
    return before, db_sha, wal_sha


def count_conversations(con: object) -> int:
    """Rows in ``conversations_v2``, else legacy ``conversations``, else 0."""
    import duckdb

    assert isinstance(con, duckdb.DuckDBPyConnection)
    tables = {
        row[0]
        for row in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
        ).fetchall()
    }
    for table in ("conversations_v2", "conversations"):
        if table in tables:
            row = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()
            return int(row[0]) if row else 0
    return 0


def _verify_copy(path: Path) -> int:
    """Open the copy read-only (the WAL is replayed in memory, files stay as they are),
    check it is readable, and count its conversations."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return count_conversations(con)
    finally:
        con.close()


def take_snapshot(
    name: str,
    source: Path,
    dest_dir: Path,
    *,
    attempts: int = 5,
    retry_delay: float = 0.05,
) -> Snapshot:
    """Copy ``source`` (and its WAL) into ``dest_dir`` consistently and verify the copy.

    Blocking; run it in a worker thread. Raises ``FileNotFoundError`` if the database
    does not exist and ``SnapshotError`` if it cannot be read or never holds still.
    """
    private_dir(dest_dir)
    dest = dest_dir / name
    last_error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            # A writer is active: give it a moment, growing, before the next copy.
            time.sleep(retry_delay * (2 ** (attempt - 1)))
        try:
            copied = _copy_once(source, dest)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise _copy_error(exc, source, dest) from exc
        if copied is None:
            last_error = None
            continue
        before, db_sha, wal_sha = copied
        try:
            conversations = _verify_copy(dest)
        except Exception as exc:  # duckdb raises many classes; any means "not readable"
            last_error = exc
            continue
        dest_wal = wal_path(dest)
        return Snapshot(
            name=name,
            source=str(source),
            path=str(dest),
            sha256=db_sha,
            size=before.db.size,
            wal=str(dest_wal) if wal_sha else None,
            wal_sha256=wal_sha,
            wal_size=before.wal.size if before.wal else 0,
            fingerprint=before,
            conversation_count=conversations,
        )
    if last_error is not None:
        raise SnapshotError(
            f"{source} is not a readable DuckDB database ({last_error}). Check that it is a "
            "Session-Buddy database written by DuckDB >= 2.0; it was not uploaded.",
            str(source),
            last_error,
        )
    raise SnapshotError(
        f"{source} kept changing while it was being copied ({attempts} attempts); "
        "try again when Session-Buddy is idle.",
        str(source),
    )


def _copy_error(exc: OSError, source: Path, dest: Path) -> SnapshotError:
    """Say what went wrong while copying: a full disk, our folder, or the source."""
    dest_dir = dest.parent
    # A partial copy only takes space that is missing already.
    for partial in (dest, wal_path(dest)):
        partial.unlink(missing_ok=True)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SnapshotError(
            f"no space left on device while copying {source} into {dest_dir} (under "
            "state_dir); free space or move state_dir to a larger disk.",
            str(source),
            exc,
        )
    if exc.filename is not None and Path(exc.filename).parent == dest_dir:
        return SnapshotError(
            f"cannot write the snapshot of {source} into {dest_dir}: "
            f"{exc.strerror or exc}; check that state_dir is writable.",
            str(source),
            exc,
        )
    return SnapshotError(
        f"cannot read {source}: {exc.strerror or exc}; check the file's permissions.",
        str(source),
        exc,
    )


def remove_snapshot_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def sweep_snapshot_dirs(root: Path) -> list[str]:
    """Remove every leftover snapshot folder under ``root`` (``state_dir/snapshots``).

    Call it only while holding the sync lock: then no live sync owns any of them,
    and what is there was left by a sync that crashed or was killed.
    """
    try:
        leftovers = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    for path in leftovers:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in leftovers]
