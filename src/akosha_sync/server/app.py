"""The MCP server: the seed's two tools, served over stdio, SSE or streamable HTTP.

The tools only talk to the daemon: a sync is a request in its queue, run in the
daemon's task group, so it outlives the call (and the connection) that asked for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import WithJsonSchema

from akosha_sync import __version__
from akosha_sync.server.daemon import SyncDaemon
from akosha_sync.server.progress import with_progress
from akosha_sync.server.repository_tools import add_repository_tools

# A sync writes new objects (never deletes or overwrites one): not read-only, not
# destructive; it reaches the bucket or Akosha: open world.
_SYNC = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True)
# Status reads local state only: read-only and closed world.
_STATUS = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=False)

__all__ = ["build_mcp_server"]

# Omitted means "as configured" (force_method, enable_fallback). The schema shows the
# plain type: clients need not know about null, and sending none is the default.
_Method = Annotated[
    Literal["auto", "cloud", "http"] | None,
    WithJsonSchema({
        "type": "string", "enum": ["auto", "cloud", "http"],
        "description": '"auto": cloud, then HTTP if enabled; "cloud" or "http" only; '
                       "omit for the configured force_method",
    }),
]
_Fallback = Annotated[bool | None, WithJsonSchema({
    "type": "boolean",
    "description": "allow falling back from cloud to Akosha's HTTP endpoint (auto only); "
                   "omit for the configured enable_fallback",
})]

_INSTRUCTIONS = (
    "akosha-sync ships this machine's Session-Buddy memories (reflection and knowledge-graph "
    "databases) to cloud storage for the Akosha aggregator, falling back to Akosha's HTTP "
    "endpoint. Use sync_to_akosha to sync now and akosha_sync_status to see configuration, "
    "problems, the running sync and recent history."
)


class _StrictServer(MCPServer):
    """Refuses a tool call with an argument the tool does not take. The SDK drops it
    silently: a misspelt ``system_id`` would make ``akosha_forget`` act on this
    machine's uploads instead of the other machine's."""

    _arguments: dict[str, frozenset[str]] | None = None

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        if self._arguments is None:
            self._arguments = {t.name: frozenset(t.input_schema.get("properties", {}))
                               for t in await self.list_tools()}
        known = self._arguments.get(name)
        if known is not None and (unknown := sorted(set(arguments) - known)):
            raise ToolError(f"{name} takes no argument {', '.join(map(repr, unknown))}; its "
                            f"arguments are {', '.join(sorted(known)) or 'none'}")
        return await super().call_tool(name, arguments, context)


def build_mcp_server(daemon: SyncDaemon) -> MCPServer:
    """An MCPServer whose tools delegate to ``daemon``."""
    server = _StrictServer(name="akosha-sync", version=__version__, instructions=_INSTRUCTIONS)

    @server.tool(annotations=_SYNC)
    async def sync_to_akosha(
        ctx: Context,
        method: _Method = None,
        enable_fallback: _Fallback = None,
    ) -> dict[str, Any]:
        """Sync memories to Akosha now: cloud first, falling back to Akosha's HTTP endpoint.

        method: "auto" (cloud, then HTTP if enabled), "cloud" (cloud only) or "http";
        omit it for the configured force_method.
        enable_fallback: allow falling back from cloud to HTTP (auto only); omit it for
        the configured enable_fallback.
        Waits for the sync and returns its result; a failure is success=false with an error.
        """
        request_id = await daemon.submit("manual", method=method, enable_fallback=enable_fallback)
        result = await with_progress(ctx, lambda progress: daemon.wait_for(request_id, progress))
        return {**result, "triggered_by": "manual"}

    @server.tool(annotations=_STATUS)
    async def akosha_sync_status() -> dict[str, Any]:
        """Configuration (secrets redacted), its problems, the running sync, the queue,
        the last result and recent history."""
        return daemon.status()

    # Issue 7: snapshots, verify, restore, forget (server/repository_tools.py).
    add_repository_tools(server, daemon.config)
    return server
