"""The errors every part of akosha-sync raises: one hierarchy under ``SyncError``.

Defined at the bottom of the dependency order so that the repository (below ``sync/``)
raises the same classes the hybrid orchestrator catches; ``akosha_sync.sync`` and
``akosha_sync.sync.protocol`` re-export them under the seed's names.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CloudUploadError", "HTTPSyncError", "HybridSyncError", "SnapshotError", "SyncError"]


class SyncError(Exception):
    """Base of every sync failure. ``method`` names the method that failed."""

    def __init__(self, message: str, method: str = "", original: BaseException | None = None):
        super().__init__(message)
        self.method = method
        self.original = original


class CloudUploadError(SyncError):
    """Cloud storage upload failed: bucket not accessible, auth failed, timeout.

    ``connect_failed`` is True when the store could not be reached at all, so a
    fallback can start at once instead of after a full retry ladder.
    """

    def __init__(
        self,
        message: str,
        method: str = "cloud",
        original: BaseException | None = None,
        *,
        connect_failed: bool = False,
    ) -> None:
        super().__init__(message, method, original)
        self.connect_failed = connect_failed


class HTTPSyncError(SyncError):
    """HTTP sync to Akosha failed: unreachable, refused, timeout, server error."""

    def __init__(
        self, message: str, method: str = "http", original: BaseException | None = None
    ) -> None:
        super().__init__(message, method, original)


class HybridSyncError(SyncError):
    """Every sync method failed; ``errors`` holds ``{"method", "error"}`` for each."""

    def __init__(
        self, message: str, method: str = "hybrid", errors: list[dict[str, Any]] | None = None
    ) -> None:
        super().__init__(message, method)
        self.errors = errors or []


class SnapshotError(SyncError):
    """A source database could not be copied consistently or is not a readable DuckDB."""

    def __init__(self, message: str, path: str, original: BaseException | None = None) -> None:
        super().__init__(message, "snapshot", original)
        self.path = path
