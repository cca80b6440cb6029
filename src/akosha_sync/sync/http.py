"""Placeholder: the HTTP fallback to Akosha's MCP endpoint (issue 4)."""

from __future__ import annotations

from typing import Any

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sync.protocol import HTTPSyncError

__all__ = ["HttpSyncMethod"]


class HttpSyncMethod:
    def __init__(self, config: AkoshaSyncConfig) -> None:
        self.config = config

    def is_available(self) -> bool:
        return False

    def get_method_name(self) -> str:
        return "http"

    async def sync(
        self, upload_reflections: bool = True, upload_knowledge_graph: bool = True, **kwargs: Any
    ) -> dict[str, Any]:
        raise HTTPSyncError("HTTP sync is not implemented yet")
