"""Turn files into pieces, new packs and an index, given the pieces already stored.

One pass per file: a worker thread reads each piece once (``os.pread`` on a
descriptor the caller keeps open), hashes it, and, if no stored pack holds it yet,
compresses it into the open pack; sealed packs go to two uploader tasks through a
channel with no buffer, so at most four packs (~32 MiB) are in memory and reading
waits for the network rather than piling up.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import msgspec
import obstore
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.errors import CloudUploadError
from akosha_sync.repository.format import (
    Index,
    IndexFile,
    PackRef,
    Piece,
    pack_id_from_key,
    pack_key,
    packs_prefix,
)
from akosha_sync.repository.packs import PackBuilder, SealedPack
from akosha_sync.repository.pieces import FileDigest, iter_pieces, piece_id
from akosha_sync.repository.store import with_retries

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["FileResult", "RepositoryWriter", "list_packs", "reusable_pieces"]

_REPORT_EVERY = 4 * 1024 * 1024  # bytes read between two progress reports

_UPLOADERS = 2


class FileResult(msgspec.Struct, frozen=True):
    name: str
    file: IndexFile
    new_pieces: int


async def list_packs(
    store: ObjectStore, config: AkoshaSyncConfig, system_id: str
) -> dict[str, int]:
    """Every pack of the system in the bucket and its size (one LIST, paged)."""

    async def listing() -> dict[str, int]:
        found: dict[str, int] = {}
        stream = obstore.list(store, prefix=packs_prefix(system_id), chunk_size=1000)
        async for batch in stream:
            for meta in batch:
                pid = pack_id_from_key(meta["path"])
                if pid is not None:
                    found[pid] = int(meta["size"])
        return found

    return await with_retries(listing, config=config, what="listing the stored packs")


def reusable_pieces(
    previous: Index | None, listed: dict[str, int]
) -> tuple[dict[str, Piece], dict[str, PackRef]]:
    """The pieces of ``previous`` whose pack really is in the bucket, whole."""
    if previous is None:
        return {}, {}
    packs = {
        pid: ref for pid, ref in previous.packs.items() if listed.get(pid) == ref.size
    }
    pieces: dict[str, Piece] = {}
    for entry in previous.files.values():
        for piece in entry.pieces:
            if piece.pack_id in packs:
                pieces.setdefault(piece.sha256, piece)
    return pieces, packs


class RepositoryWriter:
    """Writes one upload's new packs and builds its index.

    Use as ``async with writer.running(): await writer.add_file(...)``; then
    :meth:`index`. ``on_written(key)`` is told of every object written (for cleanup
    of a failed sync); ``on_progress(bytes)`` of every byte read.
    """

    def __init__(
        self,
        store: ObjectStore,
        config: AkoshaSyncConfig,
        *,
        system_id: str,
        upload_id: str,
        known: dict[str, Piece],
        known_packs: dict[str, PackRef],
        compress: bool = True,
        on_written: Callable[[str], None] | None = None,
        existing: frozenset[str] = frozenset(),
        condemned: frozenset[str] = frozenset(),
    ) -> None:
        self.store = store
        self.config = config
        self.system_id = system_id
        self.upload_id = upload_id
        self._known = dict(known)
        self._packs = dict(known_packs)
        # A new pack may not take the key of one a prune is deleting (or verify found
        # damaged): identical bytes under that key would go with it.
        avoid = {pid for key in condemned if (pid := pack_id_from_key(key))}
        self._builder = PackBuilder(
            compress=compress,
            taken=(lambda pid: pid in existing) if "*" in condemned else avoid.__contains__,
        )
        self._on_written = on_written or (lambda key: None)
        # Packs in the bucket when the sync began (ids): never reported as written, so a
        # failed sync's clean-up cannot delete one that committed uploads use.
        self._existing = existing
        # Pieces of this upload whose pack is still open (their location is not final).
        # add_file calls run one at a time, so one scanning thread touches these.
        self._open: set[str] = set()
        self._files: dict[str, IndexFile] = {}
        self._send: MemoryObjectSendStream[SealedPack] | None = None
        self.bytes_new = 0
        self.packs_written = 0

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RepositoryWriter]:
        send, receive = anyio.create_memory_object_stream[SealedPack](0)
        self._send = send
        async with anyio.create_task_group() as tg:
            for _ in range(_UPLOADERS):
                tg.start_soon(self._uploader, receive.clone())
            receive.close()
            try:
                yield self
                last = self._builder.seal()
                if last is not None:
                    self._sealed(last)
                    await send.send(last)
            finally:
                send.close()
                self._send = None

    async def _uploader(self, receive: MemoryObjectReceiveStream[SealedPack]) -> None:
        async with receive:
            async for pack in receive:
                await self._put_pack(pack)

    async def _put_pack(self, pack: SealedPack) -> None:
        key = pack_key(self.system_id, pack.pack_id)

        async def put() -> None:
            # Packs are named by their bytes: storing pieces again (deduplication off, a
            # pack that may not be reused) can rewrite a pack that was already there.
            if pack.pack_id not in self._existing:
                self._on_written(key)
            await obstore.put_async(self.store, key, pack.data, use_multipart=False)
            meta = await obstore.head_async(self.store, key)
            if int(meta["size"]) != len(pack.data):
                raise CloudUploadError(
                    f"stored pack {key} has {meta['size']} bytes, expected {len(pack.data)}; "
                    "the store lost data. Try again."
                )

        await with_retries(put, config=self.config, what=f"uploading {key}")
        self.bytes_new += len(pack.data)
        self.packs_written += 1

    def _sealed(self, pack: SealedPack) -> None:
        """A pack's pieces get their final location."""
        self._packs[pack.pack_id] = PackRef(
            pack_key(self.system_id, pack.pack_id), len(pack.data)
        )
        for piece in pack.pieces:
            self._known[piece.sha256] = piece
            self._open.discard(piece.sha256)

    def reuse_file(self, name: str, entry: IndexFile) -> None:
        """Take a file unchanged from an earlier index (its packs must be known)."""
        missing = {p.pack_id for p in entry.pieces} - set(self._packs)
        if missing:
            raise ValueError(f"{name}: packs {sorted(missing)[:3]} are not in the bucket")
        self._files[name] = entry

    def can_reuse(self, entry: IndexFile) -> bool:
        return all(p.pack_id in self._packs for p in entry.pieces)

    async def add_file(
        self,
        name: str,
        fd: int,
        *,
        database: bool,
        size: int,
        block_size: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> FileResult:
        """Read the file open at ``fd`` (``size`` bytes) once; store its new pieces."""
        if self._send is None:
            raise RuntimeError("add_file outside RepositoryWriter.running()")
        send = self._send
        digest = FileDigest()
        order: list[str] = []
        counts = {"new": 0}
        report = on_progress or (lambda n: None)

        def scan() -> None:
            reported = 0
            for data in iter_pieces(
                fd, digest, database=database, block_size=block_size, size=size
            ):
                sha = piece_id(data)
                order.append(sha)
                if sha not in self._known and sha not in self._open:
                    counts["new"] += 1
                    self._open.add(sha)
                    sealed = self._builder.add(sha, data)
                    if sealed is not None:
                        self._sealed(sealed)
                        anyio.from_thread.run(send.send, sealed)
                # Each report is a round trip to the event loop: one per piece (a
                # thousand in 250 MB) kept this thread waiting ~0.3 s; one per 4 MiB.
                if digest.size - reported >= _REPORT_EVERY or digest.size == size:
                    reported = digest.size
                    anyio.from_thread.run_sync(report, digest.size)

        try:
            await anyio.to_thread.run_sync(scan)
        finally:
            digest.close()
        if digest.size != size:
            raise CloudUploadError(
                f"{name} had {digest.size} bytes when read, {size} when opened; it changed "
                "while locked, which should not happen. Try again."
            )
        # Pieces of the still-open pack are resolved in index().
        self._files[name] = IndexFile(
            size=digest.size,
            sha256=digest.sha256,
            block_size=digest.block_size,
            pieces=[Piece(sha, "", 0, 0, 0, "raw") for sha in order],
        )
        return FileResult(name, self._files[name], counts["new"])

    def index(self) -> Index:
        """The upload's index; call after ``running()`` has finished."""
        files: dict[str, IndexFile] = {}
        used: dict[str, PackRef] = {}
        for name, entry in self._files.items():
            pieces = [
                p if p.pack_id else self._known[p.sha256] for p in entry.pieces
            ]
            for p in pieces:
                used[p.pack_id] = self._packs[p.pack_id]
            files[name] = msgspec.structs.replace(entry, pieces=pieces)
        return Index(
            upload_id=self.upload_id, system_id=self.system_id, packs=used, files=files
        )


def stored_size(entry: IndexFile) -> int:
    return sum(p.stored_length for p in entry.pieces)


def piece_count(size: int, block_size: int, *, database: bool) -> int:
    """How many pieces a file of ``size`` bytes has (for progress and plans)."""
    if size <= 0:
        return 0
    if database:
        return 1 + math.ceil(max(0, size - 12288) / block_size)
    return math.ceil(size / block_size)
