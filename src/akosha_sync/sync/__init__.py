"""The sync core: usable as a library, knows nothing of MCP.

>>> from akosha_sync.config import load_config
>>> from akosha_sync.sync import CloudSyncMethod
>>> result = await CloudSyncMethod(load_config()).sync()  # doctest: +SKIP
"""

from __future__ import annotations

from akosha_sync.sync.cloud import CloudSyncMethod
from akosha_sync.sync.protocol import (
    CloudUploadError,
    HTTPSyncError,
    HybridSyncError,
    SnapshotError,
    SyncError,
    SyncMethod,
    SyncResult,
)

__all__ = [
    "CloudSyncMethod",
    "CloudUploadError",
    "HTTPSyncError",
    "HybridSyncError",
    "SnapshotError",
    "SyncError",
    "SyncMethod",
    "SyncResult",
]
