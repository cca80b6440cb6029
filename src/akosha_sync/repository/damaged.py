"""Objects that ``verify --read-data`` found damaged, which no later upload reuses.

Key: ``systems/{sid}/damaged.json``, ``{"keys": [...]}``: pack keys (blocks layout) and
whole-object keys (files layout) whose bytes do not match what the uploads that use
them recorded. A sync reuses a stored piece or object only if it is listed in the
bucket at its recorded size; a damaged one has that size, so without this list every
later upload would point at it again and be as unrestorable as the first. A sync reads
the list after its claim, with the prune plan (:func:`akosha_sync.repository.prune.
read_condemned`), and stores those pieces again from the databases on disk. Entries for
objects that have left the bucket are dropped by the next verify that records one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec
import obstore

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["damaged_key", "read_damaged", "record_damaged"]


class _Damaged(msgspec.Struct):
    keys: list[str]


def damaged_key(system_id: str) -> str:
    return f"systems/{system_id}/damaged.json"


async def read_damaged(store: ObjectStore, system_id: str) -> frozenset[str]:
    """The keys no upload may reuse; ``{"*"}`` (reuse nothing) if the list is unreadable."""
    try:
        raw = await (await obstore.get_async(store, damaged_key(system_id))).bytes_async()
    except FileNotFoundError:
        return frozenset()
    try:
        return frozenset(msgspec.json.decode(bytes(raw), type=_Damaged).keys)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return frozenset({"*"})


async def record_damaged(
    store: ObjectStore, system_id: str, found: set[str], present: set[str]
) -> None:
    """Add ``found`` to the list, keeping of the old entries those still ``present``."""
    old = await read_damaged(store, system_id)
    keys = sorted((found | (old & present)) - {"*"})
    await obstore.put_async(store, damaged_key(system_id),
                            msgspec.json.encode(_Damaged(keys=keys)))
