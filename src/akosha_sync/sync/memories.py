"""memories.json, rendered from the snapshots straight into its upload.

Akosha reads an upload's records only from an uncompressed ``memories.json`` (see
:mod:`akosha_sync.sync.records` for its shape). On a first sync it is the largest
object by far (~2x the databases: every record with its 384-float embedding as
text), so it is never written to disk: a worker thread renders it chunk by chunk
(:class:`~akosha_sync.sync.records.MemoriesWriter`) into a small bounded channel,
and the upload consumes the channel while the rendering goes on. When the channel
is full the rendering waits, so memory stays bounded by the channel and the parts
in flight, whatever the size of the databases.

A document that ends within its first part is sent with one plain PUT (retried
like every small object); a larger one goes as one multipart upload of
``_PART_BYTES`` parts (few write requests) through a store whose own per-request
retries are on: a part's bytes are buffered, so obstore can send a part again,
while rendering the whole document again could not be (the sources may be let go).
The SHA-256 and size of what was sent are taken on the way and checked against the
stored object's size before the manifest can name it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import obstore
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from akosha_sync.repository.manifest import FileEntry
from akosha_sync.repository.store import (
    Failure,
    classify,
    explain,
    make_store,
    part_size,
    with_retries,
)
from akosha_sync.sync import records
from akosha_sync.sync.protocol import CloudUploadError, ProgressCallback

if TYPE_CHECKING:
    import duckdb
    from obstore.store import ObjectStore

    from akosha_sync.config import AkoshaSyncConfig

__all__ = ["MemoriesUpload"]

# 16 MiB parts: a 500 MiB first export is ~33 write requests, not ~100 of 5 MiB.
_PART_BYTES = 16 * 1024 * 1024
# Parts uploading while the next one fills: 2 x 16 MiB in flight.
_CONCURRENCY = 2
# Rendered chunks (~1 MiB each) waiting for the upload.
_CHANNEL_CHUNKS = 4


class MemoriesUpload:
    """One upload's ``memories.json``, streamed to ``key`` while it is rendered.

    Use as an async context manager; :meth:`add` each snapshot's records (in the
    order the databases are read), then :meth:`finish` for the stored file's entry.
    Leaving the context without :meth:`finish` (an error) stops the upload; what it
    left in the store is the caller's to remove (``written``).
    """

    def __init__(
        self,
        store: ObjectStore,
        config: AkoshaSyncConfig,
        key: str,
        *,
        progress_db: Path,
        channel: str,
        progress: ProgressCallback,
        written: list[str],
    ) -> None:
        self._store = store
        self._config = config
        self.key = key
        self._progress = progress
        self._written = written
        self._part = max(part_size(config), _PART_BYTES)
        self._digest = hashlib.sha256()
        self.size = 0
        self._writer = records.MemoriesWriter(
            self._push, progress_db=progress_db, system_id=config.system_id_resolved,
            channel=channel,
        )
        self._send: MemoryObjectSendStream[bytearray]
        self._receive: MemoryObjectReceiveStream[bytearray]
        self._send, self._receive = anyio.create_memory_object_stream[bytearray](_CHANNEL_CHUNKS)
        self._tg = anyio.create_task_group()
        self._sent = anyio.Event()
        self.export: records.MemoriesExport | None = None

    async def __aenter__(self) -> MemoriesUpload:
        await self._tg.__aenter__()
        self._tg.start_soon(self._upload)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        if exc is not None:
            self._tg.cancel_scope.cancel()
        self._send.close()
        try:
            return await self._tg.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The body's own error, which stopped the upload, is raised as it is.
            if exc is not None:
                ours, rest = group.split(lambda e: e is exc)
                if ours is not None and rest is None:
                    raise exc from None
            raise

    # ------------------------------------------------------------ rendering
    def _push(self, data: bytearray) -> None:
        """From the rendering thread: hash, count, and wait for room in the channel."""
        self._digest.update(data)
        self.size += len(data)
        anyio.from_thread.run(self._send.send, data)

    async def add(
        self, snapshot: Path | duckdb.DuckDBPyConnection, kinds: tuple[str, ...]
    ) -> None:
        """Render one snapshot's undelivered records of ``kinds`` into the upload."""
        self._progress("export:memories", self.size, 0)
        await anyio.to_thread.run_sync(self._writer.add, snapshot, kinds)

    async def finish(self) -> FileEntry:
        """End the document, wait for the upload, check the stored size."""
        self.export = await anyio.to_thread.run_sync(self._writer.close)
        self._send.close()
        await self._sent.wait()
        meta = await with_retries(
            lambda: obstore.head_async(self._store, self.key), config=self._config,
            what=f"checking {self.key}",
        )
        if int(meta["size"]) != self.size:
            raise CloudUploadError(
                f"stored object {self.key} has {meta['size']} bytes, expected {self.size}; "
                "the store lost data. Try again."
            )
        self._progress("upload:memories", self.size, self.size)
        sha = self._digest.hexdigest()
        return FileEntry(
            key=self.key, original_size=self.size, stored_size=self.size, sha256=sha,
            stored_sha256=sha, compression=None,
        )

    # ------------------------------------------------------------ uploading
    async def _upload(self) -> None:
        async with self._receive:
            head: list[bytearray] = []
            size = 0
            async for chunk in self._receive:
                head.append(chunk)
                size += len(chunk)
                if size > self._part:
                    await self._put_parts(head)
                    break
            else:
                await self._put_whole(b"".join(head))
        self._sent.set()

    async def _put_whole(self, body: bytes) -> None:
        async def put() -> None:
            self._written.append(self.key)
            await obstore.put_async(self._store, self.key, body, use_multipart=False)

        await with_retries(put, config=self._config, what=f"uploading {self.key}")

    async def _put_parts(self, head: list[bytearray]) -> None:
        async def body() -> AsyncIterator[bytearray]:
            sent = 0
            while head:  # handed over one by one: obstore copies them into its parts
                chunk = head.pop(0)
                sent += len(chunk)
                yield chunk
            async for chunk in self._receive:
                sent += len(chunk)
                yield chunk
                self._progress("upload:memories", sent, 0)

        self._written.append(self.key)
        try:
            # obstore's own per-request retries: each part's bytes are buffered.
            await obstore.put_async(
                make_store(self._config, retries=True), self.key, body(), use_multipart=True,
                chunk_size=self._part, max_concurrency=_CONCURRENCY,
            )
        except Exception as exc:
            # Explained like every store error; not retried here (obstore retried parts).
            raise CloudUploadError(
                explain(exc, self._config, f"uploading {self.key}"), original=exc,
                connect_failed=classify(exc) is Failure.CONNECT,
            ) from exc
