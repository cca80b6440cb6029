"""The daemon's HTTP face: streamable HTTP MCP at /mcp, SSE at /sse, /health, and the
session-end hook route, all in one Starlette app.

Security: with ``daemon_token`` set, every route but ``/health`` requires
``Authorization: Bearer <token>`` (checked on the raw header bytes, before any route
runs). The hook route also takes only ``application/json``, refuses requests a browser
makes for another site (an ``Origin`` that is not ours) and checks ``Host`` against
the names we answer to (DNS rebinding), as the MCP SDK does for /mcp on loopback;
its body is read with a limit while it streams in.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from mcp.server.mcpserver import MCPServer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from akosha_sync import __version__
from akosha_sync.server.daemon import HookPayloadError, SyncDaemon

__all__ = ["MAX_HOOK_BODY", "OPEN_PATHS", "build_http_app", "is_loopback_host"]

MAX_HOOK_BODY = 64 * 1024  # a SessionEnd payload is a few hundred bytes
OPEN_PATHS = frozenset({"/health"})  # answered without the token: liveness only
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names, not a bind


def is_loopback_host(host: str) -> bool:
    """True for loopback names and addresses (what only this machine can reach)."""
    name = host.strip("[]").lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def build_http_app(daemon: SyncDaemon, server: MCPServer, *, host: str) -> ASGIApp:
    """One app for every HTTP transport plus our own routes, behind the token check."""
    streamable = server.streamable_http_app(streamable_http_path="/mcp", host=host)
    sse = server.sse_app(sse_path="/sse", message_path="/messages/", host=host)
    token = daemon.config.daemon_token
    allowed_hosts = _allowed_host_names(host)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({
            "status": "ok",
            "service": "akosha-sync",
            "version": __version__,
            "running": daemon.current is not None,
            "queued": daemon.queue.pending_count(),
        })

    async def session_end(request: Request) -> JSONResponse:
        refused = _refuse_foreign(request, allowed_hosts)
        if refused is not None:
            return refused
        raw = await _read_limited(request, MAX_HOOK_BODY)
        if raw is None:
            return _error(413, f"body too large for a hook payload (limit {MAX_HOOK_BODY} bytes)")
        try:
            body: Any = json.loads(raw or b"null")
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        except RecursionError:  # small enough, but nested deeper than any hook payload
            return _error(400, "the body is not a hook payload: it is nested too deeply")
        received = time.time()
        try:
            request_id = await daemon.submit_hook(body)
        except HookPayloadError as exc:
            return _error(400, str(exc))
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

    app = Starlette(routes=routes, lifespan=lifespan)
    return _BearerAuth(app, token) if token else app


class _BearerAuth:
    """ASGI wrapper: every HTTP request but ``OPEN_PATHS`` must carry the token.

    A plain ASGI layer (not Starlette's BaseHTTPMiddleware) so the SSE and streamable
    HTTP responses stream through untouched.
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope.get("path", "") not in OPEN_PATHS:
            header = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    header = value
                    break
            if not _bearer_ok(header, self.token):
                response = _error(401, "missing or wrong bearer token; send "
                                  "'Authorization: Bearer <daemon_token>'")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _bearer_ok(header: bytes, token: bytes) -> bool:
    # Bytes on both sides: compare_digest raises on non-ASCII str (a 500, not a 401).
    scheme, _, value = header.strip().partition(b" ")
    matches = hmac.compare_digest(value.strip(), token)
    return matches and scheme.lower() == b"bearer"


def _allowed_host_names(host: str) -> frozenset[str] | None:
    """The host names the hook route answers to; None: any (a wildcard bind, where
    the token, mandatory there, is the protection)."""
    if host.strip("[]") in _WILDCARDS:
        return None
    return frozenset({*_LOOPBACK_NAMES, host.strip("[]").lower()})


def _host_name(netloc: str) -> str:
    """'[::1]:8683' -> '::1', 'localhost:80' -> 'localhost'."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:
        return ""


def _refuse_foreign(request: Request, allowed: frozenset[str] | None) -> JSONResponse | None:
    """The browser and DNS-rebinding checks for our own POST route."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return _error(415, "send the hook payload with 'Content-Type: application/json'")
    host = request.headers.get("host", "")
    if allowed is not None and _host_name(host) not in allowed:
        return _error(421, f"Host {host!r} is not this daemon's address; "
                      "call it by its address (e.g. 127.0.0.1)")
    origin = request.headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        ours = (
            parts.scheme == "http"
            and (parts.netloc.lower() == host.lower() if allowed is None
                 else _host_name(parts.netloc) in allowed)
        )
        if not ours:
            return _error(403, "requests from web pages are refused (Origin "
                          f"{origin!r} is not this daemon)")
    return None


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)
