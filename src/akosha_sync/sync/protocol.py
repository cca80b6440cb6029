"""The contract every sync method keeps, its result, and the errors it raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import msgspec

__all__ = [
    "CloudUploadError",
    "HTTPSyncError",
    "HybridSyncError",
    "ProgressCallback",
    "SnapshotError",
    "SyncError",
    "SyncMethod",
    "SyncResult",
]

# phase, bytes done, bytes expected (0 when unknown)
ProgressCallback = Callable[[str, int, int], None]


@runtime_checkable
class SyncMethod(Protocol):
    """What the hybrid orchestrator needs from a way of shipping memories."""

    async def sync(
        self,
        upload_reflections: bool = True,
        upload_knowledge_graph: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Synchronize memories to the target system."""
        ...

    def is_available(self) -> bool:
        """Check if the sync method is configured and available."""
        ...

    def get_method_name(self) -> str:
        """Get the human-readable method name."""
        ...


class SyncResult(msgspec.Struct, kw_only=True):
    """The outcome of one sync. ``to_dict()`` gives the seed's result shape plus extras."""

    method: str
    success: bool
    files_uploaded: list[str] = msgspec.field(default_factory=list)
    bytes_transferred: int = 0
    duration_seconds: float = 0.0
    upload_id: str = ""
    error: str | None = None
    # Extras beyond the seed's keys.
    files_unchanged: list[str] = msgspec.field(default_factory=list)
    files_missing: list[str] = msgspec.field(default_factory=list)
    bytes_stored: int = 0
    manifest_key: str | None = None
    # Conversations in the snapshot (all of them), and of those the ones delivered
    # for the first time by this sync (None: not tracked, export_memories off).
    conversation_count: int = 0
    new_conversation_count: int | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


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
