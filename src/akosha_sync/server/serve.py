"""Running the daemon: the task group, the chosen transport, and signal handling."""

from __future__ import annotations

import errno
import signal
import socket
from typing import Literal

import anyio
import structlog

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.app import build_mcp_server
from akosha_sync.server.daemon import SyncDaemon
from akosha_sync.server.hook import daemon_http_url, remove_daemon_file, write_daemon_file

__all__ = ["ServeRefused", "Transport", "check_bind", "serve"]

Transport = Literal["stdio", "http", "sse"]
log = structlog.get_logger("akosha_sync.serve")


class ServeRefused(Exception):
    """The daemon will not start as configured; the message says what to change."""


def check_bind(config: AkoshaSyncConfig, host: str) -> None:
    """Refuse a non-loopback address without a token: anyone who can reach it could
    call the tools and trigger uploads."""
    from akosha_sync.server.http import is_loopback_host

    if is_loopback_host(host):
        return
    if config.daemon_token:
        log.warning("listening beyond loopback over plain http: the token and the data "
                    "travel unencrypted; keep it on a private network or behind TLS",
                    host=host)
        return
    raise ServeRefused(
        f"refusing to listen on {host!r} without a daemon_token: other machines could "
        "reach the daemon. Set one (e.g. export AKOSHA_SYNC_DAEMON_TOKEN=$(openssl rand "
        "-hex 32), or daemon_token in the config file) and send it as "
        "'Authorization: Bearer <token>', or bind to 127.0.0.1."
    )


async def serve(
    config: AkoshaSyncConfig,
    *,
    transport: Transport,
    host: str | None = None,
    port: int | None = None,
    grace_seconds: float = 10.0,
    config_path: str | None = None,
) -> None:
    """Serve until stdin closes (stdio) or SIGINT/SIGTERM arrives.

    Raises ``ServeRefused`` before anything starts for an unsafe HTTP bind.
    """
    listener: socket.socket | None = None
    if transport != "stdio":
        check_bind(config, host or config.daemon_host)
        listener = _listen(host or config.daemon_host,
                           config.daemon_port if port is None else port)
    daemon = SyncDaemon(config, grace_seconds=grace_seconds, hand_over=True,
                        config_path=config_path)
    daemon.transport = transport
    server = build_mcp_server(daemon)
    stop = anyio.Event()
    # The signal watcher outlives the daemon's graceful shutdown, so a second SIGTERM
    # (Claude Code sends SIGINT, then SIGTERM) does not kill a sync that is finishing.
    async with anyio.create_task_group() as signals:
        signals.start_soon(_watch_signals, stop)
        async with daemon.running(), anyio.create_task_group() as tg:
            if transport == "stdio":
                tg.start_soon(_until, stop, daemon, tg)
                await server.run_stdio_async()
                log.info("stdin closed; shutting down")
            else:
                assert listener is not None
                await _serve_http(daemon, server, host or config.daemon_host, listener, stop)
            tg.cancel_scope.cancel()
        signals.cancel_scope.cancel()


def _listen(host: str, port: int) -> socket.socket:
    """The daemon's listening socket, bound before anything starts: a port in use is a
    sentence, not a traceback from inside uvicorn's startup."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ServeRefused(f"cannot listen on {host!r}: {exc}; use --host with an address "
                           "of this machine, such as 127.0.0.1") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        busy = " (another akosha-sync daemon? `akosha-sync status` names the one running)"
        raise ServeRefused(
            f"cannot listen on {host}:{port}: {exc.strerror}"
            + (busy if exc.errno == errno.EADDRINUSE else "")
            + "; stop what holds it, or pick another port with --port (0 picks a free one) "
            "or daemon_port."
        ) from exc
    sock.setblocking(False)
    return sock


async def _until(stop: anyio.Event, daemon: SyncDaemon, tg: anyio.abc.TaskGroup) -> None:
    await stop.wait()
    await daemon.settle()  # answers the waiting tool calls while stdout still works
    tg.cancel_scope.cancel()


async def _watch_signals(stop: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stop.is_set():
                log.info("signal received; already shutting down", signal=name)
            else:
                log.info("signal received; shutting down", signal=name)
                stop.set()


async def _serve_http(
    daemon: SyncDaemon, server: object, host: str, listener: socket.socket, stop: anyio.Event
) -> None:
    import uvicorn

    from akosha_sync.server.http import build_http_app

    app = build_http_app(daemon, server, host=host)  # type: ignore[arg-type]

    class _Server(uvicorn.Server):
        # Signals are ours (graceful sync shutdown), not uvicorn's.
        def install_signal_handlers(self) -> None:
            return None

        def capture_signals(self):  # type: ignore[no-untyped-def]
            import contextlib

            return contextlib.nullcontext()

    uv = _Server(uvicorn.Config(app, host=host, port=listener.getsockname()[1], log_config=None,
                                access_log=False, lifespan="on", timeout_graceful_shutdown=3))

    async def stopper() -> None:
        await stop.wait()
        # Serve on through the sync's grace: a waiting tool call gets its result (or a
        # "shutting down, still queued" answer) instead of a dropped connection.
        await daemon.settle()
        uv.should_exit = True

    async def announce() -> None:
        while not uv.started:  # noqa: ASYNC110 - uvicorn offers a flag, not an event
            await anyio.sleep(0.01)
        bound = uv.servers[0].sockets[0].getsockname()
        url = daemon_http_url(host, bound[1])
        write_daemon_file(daemon.config, url)
        log.info("daemon listening", url=url, mcp=f"{url}/mcp", sse=f"{url}/sse")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stopper)
            tg.start_soon(announce)
            await uv.serve(sockets=[listener])
            tg.cancel_scope.cancel()
    finally:
        listener.close()
        remove_daemon_file(daemon.config)
