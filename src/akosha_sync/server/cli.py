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

    install = sub.add_parser(
        "install", help="register with Claude Code, or run the daemon as a service")
    install.add_argument("target", choices=["claude", "service"])
    install.add_argument("--mode", choices=["stdio", "http"], default="stdio",
                         help="claude: stdio (default) registers a client-launched server and "
                         "command hooks that never lose a session end; http registers the "
                         "daemon's URL and http hooks (run the daemon as a service)")
    _target_options(install)

    uninstall = sub.add_parser("uninstall", help="remove exactly what install added")
    uninstall.add_argument("target", choices=["claude", "service"])
    _target_options(uninstall)

    # doctor (issue 7)
    doctor = sub.add_parser("doctor", help="check the configuration, the bucket, Akosha, "
                            "the daemon and Claude Code's set-up; exit 1 if any check fails")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")


def _target_options(parser: Any) -> None:
    parser.add_argument("--scope", choices=["user", "project"], default="user",
                        help="claude: ~/.claude.json + ~/.claude/settings.json (user) or "
                        ".mcp.json + .claude/settings.json (project)")
    parser.add_argument("--platform", choices=["linux", "macos"], default=None,
                        help="service: systemd (linux) or launchd (macos); default: this "
                        "machine's")
    parser.add_argument("--write", action="store_true",
                        help="apply the changes (default: print them)")


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
    if args.command in ("install", "uninstall"):
        return _install(config, args)
    if args.command == "doctor":  # issue 7
        from akosha_sync.server.doctor import run_doctor

        return run_doctor(config, as_json=args.json)
    raise SystemExit(f"unknown command {args.command!r}")


def _install(config: Any, args: argparse.Namespace) -> int:
    from akosha_sync.server import install

    try:
        if args.command == "install" and args.target == "claude":
            return install.install_claude(config, mode=args.mode, scope=args.scope,
                                          write=args.write, config_path=args.config)
        if args.command == "install":
            return install.install_service(config, platform=args.platform, write=args.write,
                                           config_path=args.config)
        if args.target == "claude":
            return install.uninstall_claude(config, scope=args.scope, write=args.write)
        return install.uninstall_service(platform=args.platform, write=args.write)
    except (install.InstallError, OSError) as exc:
        print(f"akosha-sync {args.command}: {exc}", file=sys.stderr)
        return 2


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
    from akosha_sync.server.serve import ServeRefused

    try:
        anyio.run(lambda: serve(config, transport=args.transport, host=args.host,
                                port=args.port, grace_seconds=args.grace,
                                config_path=args.config))
    except ServeRefused as exc:
        print(f"akosha-sync serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _drain(config: Any) -> int:
    import anyio

    from akosha_sync.logs import configure_logging
    from akosha_sync.server.daemon import SyncDaemon

    configure_logging(config, stderr_level=None)
    # The daemon's own worker: each request runs with its method and fallback, a
    # request another live process runs is left to it, and a dead one's is recovered.
    return 1 if anyio.run(SyncDaemon(config).drain) else 0
