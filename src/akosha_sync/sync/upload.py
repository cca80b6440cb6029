"""One cloud sync in progress, as the layouts see it.

:class:`Upload` is the bookkeeping of one sync (what it wrote, read and exported);
:class:`CloudContext` is what the layouts (:mod:`~akosha_sync.sync.blocks`,
:mod:`~akosha_sync.sync.files`) use of the method running it. Both live here so that
the layouts need not import :mod:`~akosha_sync.sync.cloud`, which imports them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import structlog

if TYPE_CHECKING:
    from obstore.store import ObjectStore

    from akosha_sync.config import AkoshaSyncConfig
    from akosha_sync.repository.manifest import FileEntry
    from akosha_sync.repository.source import Source
    from akosha_sync.sync.protocol import ProgressCallback
    from akosha_sync.sync.snapshot import Snapshot
    from akosha_sync.sync.state import StoredFile, TargetState

__all__ = ["CloudContext", "Upload", "log_carried_over"]

log = structlog.get_logger("akosha_sync.cloud")


class Upload:
    """Mutable bookkeeping of one sync in progress."""

    def __init__(self, upload_id: str) -> None:
        self.upload_id = upload_id
        # When the claim was made, by the wall clock (which, unlike the monotonic one,
        # goes on while the machine sleeps): see CloudSyncMethod._still_ours.
        self.claimed_wall = time.time()
        self.written: list[str] = []  # keys written by this sync, for cleanup
        self.files: dict[str, FileEntry] = {}
        self.uploaded_keys: list[str] = []
        self.unchanged: list[str] = []
        self.missing: list[str] = []
        self.errors: list[str] = []
        # A database that could not be read, kept at its last stored version: file
        # name (database and WAL) -> the upload that stored it.
        self.carried_over: dict[str, str] = {}
        # Databases the caller left out of this sync (upload_reflections=False, ...):
        # carried over too, so that every upload holds the whole memory.
        self.not_selected: list[str] = []
        self.snapshots: dict[str, Snapshot] = {}
        self.new_state: dict[str, StoredFile] = {}
        self.exported: dict[str, list[str]] = {}  # per kind; delivered once committed
        self.undeliverable: dict[str, int] = {}  # per kind: records with no embedding
        self.bytes_sent = 0
        # Blocks layout: the databases held still until the export (their connections
        # give the records); the index key, new bytes, per-file manifest fields.
        self.sources: dict[str, Source] = {}
        self.index_key: str | None = None
        self.bytes_new = 0
        self.extra: dict[str, dict[str, Any]] = {}
        self.fingerprints: dict[str, Any] = {}
        # Per database read: "locked" (the live files under DuckDB's shared lock) or
        # "copy" (a writer held it: a verified private copy).
        self.how_read: dict[str, str] = {}
        # Set before the manifest PUT: from then on the upload may be committed, so
        # nothing of it may be deleted (an answer can be lost after the store wrote it).
        self.commit_attempted = False


class CloudContext(Protocol):
    """What a layout needs of :class:`~akosha_sync.sync.cloud.CloudSyncMethod`."""

    config: AkoshaSyncConfig

    @property
    def store(self) -> ObjectStore: ...

    @property
    def condemned(self) -> frozenset[str]:
        """Keys (or pack ids) a running prune condemned: reused by no upload."""
        ...

    def _records_exported(self, state: TargetState | None, name: str) -> bool: ...

    def _kinds_of(self, name: str) -> tuple[str, ...]: ...

    def _get_cloud_path(self, db_name: str, upload_id: str) -> str: ...

    async def _upload_file(
        self,
        path: Path,
        key: str,
        upload: Upload,
        *,
        compress: bool,
        progress: ProgressCallback,
        phase: str,
        known_sha256: str | None = None,
    ) -> FileEntry: ...


def log_carried_over(upload: Upload, name: str) -> None:
    """Say why ``name`` is kept at the version an earlier upload stored."""
    if name in upload.not_selected:
        log.info("not selected for this sync; its last stored version is kept in this "
                 "upload", file=name, stored_by=upload.carried_over[name])
    else:
        log.warning("database not readable; its last stored version is kept in this "
                    "upload", file=name, stored_by=upload.carried_over[name])
