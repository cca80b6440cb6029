"""Command-line entries of the daemon side: serve, hook, drain, install.

Kept light at import time: ``akosha-sync hook`` runs inside Claude Code's hook
budget, so heavy modules are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_commands", "run"]


def add_commands(sub: Any) -> None:
    """Register the daemon's subcommands on the main parser."""
    serve = sub.add_parser("serve", help="run the MCP server daemon")
    serve.add_argument("--transport", choices=["stdio", "http", "sse"], default="stdio",
                       help="stdio for a client-launched server; http (also serves SSE) "
                       "for the long-running daemon")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None,
                       help="port (default: daemon_port, 8683; 0 picks a free one)")
    serve.add_argument("--grace", type=float, default=10.0, metavar="SECONDS",
                       help="how long a running sync may finish at shutdown")

    hook = sub.add_parser("hook", help="Claude Code hook command (reads the hook JSON on stdin)")
    hook.add_argument("event", choices=["session-end", "pre-compact"])

    sub.add_parser("drain", help="run the queued sync requests once, then exit")

    install = sub.add_parser("install", help="register akosha-sync with an MCP client")
    install.add_argument("client", choices=["claude"])
    install.add_argument("--mode", choices=["http", "stdio"], default="http",
                         help="http: the daemon + an http SessionEnd hook (recommended); "
                         "stdio: a client-launched server + a command hook")
    install.add_argument("--scope", choices=["user", "project"], default="user")
    install.add_argument("--write", action="store_true",
                         help="apply the changes to Claude Code's files (default: print them)")


def run(args: argparse.Namespace) -> int:
    from akosha_sync.config import load_config

    config = load_config(args.config)
    if args.command == "hook":
        from akosha_sync.server.hook import run_hook

        return run_hook(config, sys.stdin.read(), config_path=args.config)
    if args.command == "serve":
        return _serve(config, args)
    if args.command == "drain":
        return _drain(config)
    if args.command == "install":
        from akosha_sync.server.install import install_claude

        return install_claude(config, mode=args.mode, scope=args.scope, write=args.write,
                              config_path=args.config)
    raise SystemExit(f"unknown command {args.command!r}")


def _serve(config: Any, args: argparse.Namespace) -> int:
    import logging

    import anyio

    from akosha_sync.logs import configure_logging
    from akosha_sync.server.serve import serve

    problems = config.validate()
    configure_logging(config, stderr_level=logging.INFO)
    for problem in problems:
        # Serve anyway: akosha_sync_status shows the problems to the user's assistant.
        print(f"akosha-sync: configuration problem: {problem}", file=sys.stderr)
    anyio.run(lambda: serve(config, transport=args.transport, host=args.host, port=args.port,
                            grace_seconds=args.grace))
    return 0


def _drain(config: Any) -> int:
    import anyio

    from akosha_sync.logs import configure_logging
    from akosha_sync.server.daemon import SyncDaemon

    configure_logging(config, stderr_level=None)
    # The daemon's own worker: each request runs with its method and fallback, a
    # request another live process runs is left to it, and a dead one's is recovered.
    return 1 if anyio.run(SyncDaemon(config).drain) else 0
