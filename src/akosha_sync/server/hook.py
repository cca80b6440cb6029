"""The session-end hook command, for Claude Code ``command`` hooks.

It must finish well inside Claude Code's 1.5 s hook budget, so it imports nothing
heavy (no MCP SDK, DuckDB or obstore): it forwards the hook JSON to the running
daemon; if none answers, it records the request in the durable queue and starts a
detached one-shot ``akosha-sync drain`` so the session end is never lost.
"""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from akosha_sync._fs import atomic_write, private_dir
from akosha_sync.config import AkoshaSyncConfig

__all__ = [
    "DAEMON_FILE",
    "daemon_http_url",
    "read_daemon_url",
    "remove_daemon_file",
    "run_hook",
    "running_daemon",
    "write_daemon_file",
]

DAEMON_FILE = "daemon.json"
_FORWARD_TIMEOUT = 0.5


def daemon_http_url(host: str, port: int) -> str:
    """The daemon's base URL; an IPv6 address goes in brackets (``http://[::1]:8683``)."""
    host = host.strip("[]")
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_daemon_file(config: AkoshaSyncConfig, url: str) -> None:
    """Tell hook commands where the running daemon listens."""
    private_dir(config.state_path)
    atomic_write(config.state_path / DAEMON_FILE, json.dumps({"pid": os.getpid(), "url": url}))


def remove_daemon_file(config: AkoshaSyncConfig) -> None:
    path = config.state_path / DAEMON_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def running_daemon(config: AkoshaSyncConfig) -> dict[str, Any] | None:
    """``{"pid", "url"}`` of the HTTP daemon serving this state folder, if it runs."""
    try:
        info = json.loads((config.state_path / DAEMON_FILE).read_text(encoding="utf-8"))
        pid = int(info["pid"])
        os.kill(pid, 0)
        return {"pid": pid, "url": str(info["url"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_daemon_url(config: AkoshaSyncConfig) -> str:
    """The URL in the daemon file if its process is alive, else the configured one."""
    daemon = running_daemon(config)
    return str(daemon["url"]) if daemon else config.daemon_url


def _forward(url: str, body: bytes, token: str) -> tuple[int, str]:
    request = urllib.request.Request(  # noqa: S310 - loopback URL from our own config
        f"{url}/hooks/session-end", data=body, method="POST",
        headers={"Content-Type": "application/json"},
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=_FORWARD_TIMEOUT) as response:  # noqa: S310
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def spawn_drain(config_path: str | None) -> None:
    """Start a detached one-shot ``akosha-sync drain`` for the queue (it outlives us)."""
    args = [sys.executable, "-m", "akosha_sync"]
    if config_path:
        args += ["--config", config_path]
    args.append("drain")
    subprocess.Popen(  # detached: it must outlive Claude Code
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def run_hook(config: AkoshaSyncConfig, raw: str, *, config_path: str | None = None) -> int:
    """Forward or record one hook invocation; returns the process exit code."""
    from akosha_sync.server.payload import HookPayloadError, validate_hook_payload

    try:
        payload: Any = validate_hook_payload(json.loads(raw or "null"))
    except (ValueError, HookPayloadError) as exc:
        print(f"akosha-sync hook: ignored: {exc}", file=sys.stderr)
        return 0  # never fail the user's session over a malformed hook input
    except RecursionError:
        print("akosha-sync hook: ignored: the input is nested too deeply to be a hook "
              "payload", file=sys.stderr)
        return 0  # never fail the user's session over a malformed hook input
    if not config.upload_on_session_end:
        return 0
    url = read_daemon_url(config)
    try:
        status, text = _forward(url, raw.encode("utf-8"), config.daemon_token)
        if status in (200, 202):
            return 0
        print(f"akosha-sync hook: daemon at {url} answered {status}: {text[:200]}",
              file=sys.stderr)
    except (OSError, ValueError, http.client.HTTPException):
        pass  # no daemon, a damaged daemon file or a garbled answer: record it ourselves
    from akosha_sync.server.queue import JobQueue

    trigger = "session-end" if payload["hook_event_name"] == "SessionEnd" else "pre-compact"
    try:
        JobQueue(Path(config.state_path)).enqueue(trigger, payload=payload)
    except (OSError, sqlite3.Error) as exc:
        # One line the user can act on, not a traceback; the session end is not kept.
        print(f"akosha-sync hook: the session end could not be queued in "
              f"{config.state_path} ({exc}); check that the folder is writable and the "
              "disk not full, then run `akosha-sync sync`.", file=sys.stderr)
        return 1
    spawn_drain(config_path)
    return 0
