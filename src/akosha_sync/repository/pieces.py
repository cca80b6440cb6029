"""Splitting a file into pieces (see :mod:`akosha_sync.repository.format`). Pure, streaming.

Reads go through ``os.pread`` on a file descriptor the caller holds open: the caller
decides what keeps the bytes from changing (a DuckDB lock or a private copy), and
closing a descriptor of a locked database would drop the process's lock on it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterator

from akosha_sync.repository.format import DEFAULT_BLOCK_SIZE, HEADER_AREA, block_size_from_header

__all__ = ["FileDigest", "iter_pieces", "piece_id", "pread_all"]


def piece_id(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class FileDigest:
    """Whole-file SHA-256 and size, taken while the pieces stream past.

    The whole-file hash runs in a thread of its own (hashlib lets go of the GIL),
    beside the reader's per-piece hashing: reading a database whose pieces are all
    known already (the usual sync at a session's end) then takes about half as long
    on two cores. At most :data:`_IN_FLIGHT` pieces wait for it. Call :meth:`close`
    (or read :attr:`sha256`) when done, also after a failure, to end the thread.
    """

    def __init__(self) -> None:
        self.size = 0
        self.block_size = DEFAULT_BLOCK_SIZE
        self._sha = hashlib.sha256()
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=_IN_FLIGHT)
        self._thread: threading.Thread | None = None

    def update(self, data: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="akosha-file-hash",
                                            daemon=True)
            self._thread.start()
        self.size += len(data)
        self._queue.put(data)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._sha.update(data)

    def close(self) -> None:
        """Wait for the hash to take in every piece given (idempotent)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    @property
    def sha256(self) -> str:
        self.close()
        return self._sha.hexdigest()


_IN_FLIGHT = 16  # pieces (4 MiB of 256 KiB blocks) read but not yet in the file's hash


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def iter_pieces(
    fd: int,
    digest: FileDigest,
    *,
    database: bool,
    block_size: int | None = None,
    size: int | None = None,
) -> Iterator[bytes]:
    """The pieces of the file open at ``fd``, in order, feeding ``digest`` on the way.

    ``database``: a DuckDB file (header area first, block size from its header);
    else a WAL or any file cut every ``block_size`` bytes from offset 0. ``size``
    stops at that length (the size seen when the file was locked or copied).
    """
    offset = 0
    limit = size if size is not None else os.fstat(fd).st_size
    step = block_size or DEFAULT_BLOCK_SIZE
    if database:
        header = pread_all(fd, min(HEADER_AREA, limit), 0)
        step = block_size or block_size_from_header(header)
        if header:
            digest.update(header)
            offset = len(header)
            yield header
    digest.block_size = step
    while offset < limit:
        data = pread_all(fd, min(step, limit - offset), offset)
        if not data:
            break
        digest.update(data)
        offset += len(data)
        yield data
