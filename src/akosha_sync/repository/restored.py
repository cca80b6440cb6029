"""The upload a restore put into ``data_dir``, so the next sync deduplicates against it.

A sync reuses the pieces of the last upload it made (and of nothing older: reading
every index would cost a request per upload). After ``restore --force`` of an older
upload into ``data_dir``, the databases on disk are that older upload's, and most of
their pieces are in packs the last upload does not use: without this note the next
sync would store them all again. The restore writes ``restored.json`` in the state
folder (this system, this bucket, the upload's manifest); the next blocks sync of the
same system and bucket reads that upload's index too and reuses what its packs still
hold (checked against the bucket like every reused piece), and a committed sync
clears the note. It is only a hint: a missing or stale note costs space, never data.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from akosha_sync._fs import atomic_write, private_dir
from akosha_sync.config import endpoint_identity

if TYPE_CHECKING:
    from akosha_sync.config import AkoshaSyncConfig

__all__ = ["RESTORED_FILE", "clear_restored", "note_restored", "restored_manifest_key"]

RESTORED_FILE = "restored.json"


class _Restored(msgspec.Struct, frozen=True):
    system_id: str
    endpoint: str
    bucket: str
    upload_id: str
    manifest_key: str


def _path(config: AkoshaSyncConfig) -> Path:
    return config.state_path / RESTORED_FILE


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def note_restored(
    config: AkoshaSyncConfig, *, system_id: str, upload_id: str, manifest_key: str,
    target: Path,
) -> bool:
    """After a restore: remember it if it went into this system's ``data_dir``.
    Returns whether a note was written (a state folder that cannot be written only
    costs the next sync some space)."""
    if system_id != config.system_id_resolved or not _same_folder(target, config.data_path):
        return False
    note = _Restored(system_id=system_id, endpoint=endpoint_identity(config.cloud_endpoint),
                     bucket=config.cloud_bucket, upload_id=upload_id,
                     manifest_key=manifest_key)
    try:
        private_dir(config.state_path)
        atomic_write(_path(config), msgspec.json.encode(note) + b"\n")
    except OSError:
        return False
    return True


def restored_manifest_key(config: AkoshaSyncConfig) -> str | None:
    """The manifest of the upload last restored into ``data_dir`` for this system and
    bucket, if a sync has not committed since; None otherwise."""
    try:
        note = msgspec.json.decode(_path(config).read_bytes(), type=_Restored)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    if (note.system_id, note.endpoint, note.bucket) != (
        config.system_id_resolved, endpoint_identity(config.cloud_endpoint), config.cloud_bucket
    ):
        return None
    return note.manifest_key


def clear_restored(config: AkoshaSyncConfig) -> None:
    """A sync committed: its upload holds the restored pieces now."""
    with contextlib.suppress(OSError):
        _path(config).unlink(missing_ok=True)
