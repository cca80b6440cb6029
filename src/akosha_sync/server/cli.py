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

    # doctor (issue 7)
    doctor = sub.add_parser("doctor", help="check the configuration, the bucket, Akosha, "
                            "the daemon and Claude Code's set-up; exit 1 if any check fails")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")


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
    if args.command == "doctor":  # issue 7
        from akosha_sync.server.doctor import run_doctor

        return run_doctor(config, as_json=args.json)
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
    from akosha_sync.server.serve import ServeRefused

    try:
        anyio.run(lambda: serve(config, transport=args.transport, host=args.host,
                                port=args.port, grace_seconds=args.grace))
    except ServeRefused as exc:
        print(f"akosha-sync serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _drain(config: Any) -> int:
    import time

    import anyio

    from akosha_sync.logs import configure_logging
    from akosha_sync.server.queue import JobQueue
    from akosha_sync.sync.runner import run_sync

    configure_logging(config, stderr_level=None)
    queue = JobQueue(config.state_path)

    async def drain() -> int:
        failures = 0
        while requests := queue.claim_pending():
            started = time.time()
            triggers = [r.trigger for r in requests]
            try:
                result = await run_sync(config, trigger=",".join(sorted(set(triggers))))
            except BaseException:
                queue.release([r.id for r in requests])
                raise
            queue.finish([r.id for r in requests], result, triggers=triggers,
                          started_at=started, finished_at=time.time())
            failures += not result.get("success")
        return failures

    return 1 if anyio.run(drain) else 0
