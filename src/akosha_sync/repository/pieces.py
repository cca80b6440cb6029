"""Splitting a file into pieces (see :mod:`akosha_sync.repository.format`). Pure, streaming.

Reads go through ``os.pread`` on a file descriptor the caller holds open: the caller
decides what keeps the bytes from changing (a DuckDB lock or a private copy), and
closing a descriptor of a locked database would drop the process's lock on it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

from akosha_sync.repository.format import DEFAULT_BLOCK_SIZE, HEADER_AREA, block_size_from_header

__all__ = ["FileDigest", "iter_pieces", "piece_id"]


def piece_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FileDigest:
    """Whole-file SHA-256 and size, taken while the pieces stream past."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0
        self.block_size = DEFAULT_BLOCK_SIZE

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()


def _pread_all(fd: int, length: int, offset: int) -> bytes:
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
        header = _pread_all(fd, min(HEADER_AREA, limit), 0)
        step = block_size or block_size_from_header(header)
        if header:
            digest.sha.update(header)
            digest.size += len(header)
            offset = len(header)
            yield header
    digest.block_size = step
    while offset < limit:
        data = _pread_all(fd, min(step, limit - offset), offset)
        if not data:
            break
        digest.sha.update(data)
        digest.size += len(data)
        offset += len(data)
        yield data
