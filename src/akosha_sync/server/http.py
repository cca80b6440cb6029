"""The daemon's HTTP face: streamable HTTP MCP at /mcp, SSE at /sse, /health, and the
session-end hook route, all in one Starlette app on loopback."""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route

from akosha_sync import __version__
from akosha_sync.server.daemon import HookPayloadError, SyncDaemon

__all__ = ["MAX_HOOK_BODY", "build_http_app"]

MAX_HOOK_BODY = 64 * 1024  # a SessionEnd payload is a few hundred bytes


def build_http_app(daemon: SyncDaemon, server: MCPServer, *, host: str) -> Starlette:
    """One app for every HTTP transport plus our own routes."""
    streamable = server.streamable_http_app(streamable_http_path="/mcp", host=host)
    sse = server.sse_app(sse_path="/sse", message_path="/messages/", host=host)
    token = daemon.config.daemon_token

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "service": "akosha-sync",
            "version": __version__,
            "running": daemon.current is not None,
            "queued": daemon.queue.pending_count(),
        })

    async def session_end(request: Request) -> JSONResponse:
        if token and not _bearer_ok(request.headers.get("authorization", ""), token):
            return JSONResponse(
                {"error": "missing or wrong bearer token; "
                 "send 'Authorization: Bearer <daemon_token>'"},
                status_code=401,
            )
        raw = await request.body()
        if len(raw) > MAX_HOOK_BODY:
            return JSONResponse({"error": "body too large for a hook payload"}, status_code=413)
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        received = time.time()
        try:
            request_id = await daemon.submit_hook(body)
        except HookPayloadError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if request_id is None:
            return JSONResponse(
                {"accepted": False, "reason": "upload_on_session_end is off"}, status_code=200
            )
        return JSONResponse(
            {"accepted": True, "request_id": request_id, "received_at": received},
            status_code=202,
        )

    routes: list[BaseRoute] = [
        Route("/health", health, methods=["GET"]),
        Route("/hooks/session-end", session_end, methods=["POST"]),
        *streamable.routes,
        *sse.routes,
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with server.session_manager.run():
            yield

    return Starlette(routes=routes, lifespan=lifespan)


def _bearer_ok(header: str, token: str) -> bool:
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)
