"""Packs: new pieces compressed and appended into ~8 MiB objects; reading them back.

:class:`PackBuilder` is pure: it compresses pieces, appends them to a buffer and
seals it into a :class:`SealedPack` (its id is the SHA-256 of its bytes, so a piece's
location is only final when its pack is sealed). Writing the sealed pack is the
caller's (one plain PUT). :func:`extract_piece` takes a piece out of a pack's bytes
and checks it.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from typing import Any

import msgspec

from akosha_sync.repository.format import PACK_TARGET_SIZE, Compression, Piece
from akosha_sync.repository.pieces import piece_id

__all__ = ["PackBuilder", "PieceError", "SealedPack", "extract_piece", "name_pack"]

_SALT_BYTES = 16
_ZSTD_LEVEL = 1  # ~2x the speed of level 3 for a few percent more bytes (bench/)


class PieceError(ValueError):
    """A stored piece is missing, truncated or does not hash to its id."""


class SealedPack(msgspec.Struct, frozen=True):
    pack_id: str
    data: bytearray  # handed over, not copied: the builder starts a new buffer
    pieces: list[Piece]


def name_pack(data: bytearray, taken: Callable[[str], bool] | None = None) -> str:
    """The id of a pack's bytes: their SHA-256, unless ``taken`` says a pack of that id
    may not be written (one a prune is deleting, or one verify found damaged: writing
    identical bytes under its key would be deleted with it, or be avoided with it).
    Then random bytes that no piece refers to are appended until the id is free."""
    pack_id = hashlib.sha256(data).hexdigest()
    while taken is not None and taken(pack_id):
        data += secrets.token_bytes(_SALT_BYTES)
        pack_id = hashlib.sha256(data).hexdigest()
    return pack_id


class PackBuilder:
    """Compress pieces into packs of about ``target`` bytes. ``taken``: pack ids that
    must not be produced (see :func:`name_pack`)."""

    def __init__(
        self, *, compress: bool = True, target: int = PACK_TARGET_SIZE,
        taken: Callable[[str], bool] | None = None,
    ) -> None:
        self.target = target
        self._taken = taken
        self._compressor: Any = None
        if compress:
            import zstandard

            self._compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
        self._buffer = bytearray()
        # (sha256, offset, stored_length, length, compression) of the open pack
        self._pending: list[tuple[str, int, int, int, Compression]] = []

    def __len__(self) -> int:
        return len(self._buffer)

    def add(self, sha256: str, data: bytes) -> SealedPack | None:
        """Append one piece; returns the pack it filled, sealed, if any."""
        stored: bytes = data
        compression: Compression = "raw"
        if self._compressor is not None:
            packed = self._compressor.compress(data)
            if len(packed) < len(data):
                stored, compression = packed, "zstd"
        self._pending.append((sha256, len(self._buffer), len(stored), len(data), compression))
        self._buffer += stored
        return self.seal() if len(self._buffer) >= self.target else None

    def seal(self) -> SealedPack | None:
        """Close the open pack (None if it is empty)."""
        if not self._pending:
            return None
        data = self._buffer
        pack_id = name_pack(data, self._taken)
        pieces = [Piece(sha, pack_id, off, stored, length, comp)
                  for sha, off, stored, length, comp in self._pending]
        self._buffer = bytearray()
        self._pending = []
        return SealedPack(pack_id, data, pieces)


_local = threading.local()


def _decompressor() -> Any:
    """One zstd context per thread: creating one per piece costs more than the piece."""
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        import zstandard

        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def extract_piece(
    pack: bytes | memoryview, piece: Piece, *, where: str, check: bool = True
) -> bytes | memoryview:
    """The raw bytes of ``piece`` from its pack's bytes, checked against its id.

    ``where`` names the pack object in the error (e.g. its key). A raw piece comes
    back as a view into ``pack`` (no copy). ``check=False`` checks the length only,
    for a caller that hashes every byte another way (restore: the whole file).
    """
    end = piece.offset + piece.stored_length
    if end > len(pack):
        raise PieceError(
            f"piece {piece.sha256[:16]} at bytes {piece.offset}..{end} of {where} is beyond "
            f"the pack's {len(pack)} bytes: the pack is truncated or the index is stale"
        )
    stored = memoryview(pack)[piece.offset : end]
    data: bytes | memoryview
    if piece.compression == "zstd":
        import zstandard

        try:
            data = _decompressor().decompress(stored, max_output_size=piece.length)
        except zstandard.ZstdError as exc:
            raise PieceError(
                f"piece {piece.sha256[:16]} in {where} does not decompress ({exc}): "
                "the pack is damaged"
            ) from exc
    else:
        data = stored
    damaged = check and piece_id(data) != piece.sha256
    if len(data) != piece.length or damaged:
        raise PieceError(
            f"piece {piece.sha256[:16]} in {where} does not match its SHA-256: the pack is "
            "damaged"
        )
    return data
