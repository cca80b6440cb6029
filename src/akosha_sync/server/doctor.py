"""``akosha-sync doctor``: is everything in place for a session end to reach the store?

One line per check, ``ok`` or what is wrong and the fix: the configuration, the
credentials, the bucket (a probe object written, read back and removed under
``akosha-sync-doctor/``, a prefix nothing else uses), Akosha's ``/health`` and an MCP
handshake, the daemon, and Claude Code's registration and SessionEnd hook (as
``akosha-sync install claude`` writes them, or the Claude Code plugin). A check that
does not apply to this set-up (no bucket configured, no HTTP fallback, no daemon
needed) is skipped and does not fail. Exit status 0 only when nothing failed.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx
import msgspec

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.redact import scrubber_for

__all__ = ["PROBE_PREFIX", "Check", "run_checks", "run_doctor"]

Status = Literal["ok", "fail", "skip"]
PROBE_PREFIX = "akosha-sync-doctor/"
SERVER_NAME = "akosha-sync"
_HOOK_ROUTE = "/hooks/session-end"
_TIMEOUT_S = 5.0
_TOOL = "batch_store_memories"  # what the HTTP fallback calls


class Check(msgspec.Struct, kw_only=True):
    """One check's outcome; ``fix`` says what to do when it failed."""

    name: str
    status: Status
    detail: str = ""
    fix: str = ""


def _ok(name: str, detail: str = "") -> Check:
    return Check(name=name, status="ok", detail=detail)


def _fail(name: str, detail: str, fix: str) -> Check:
    return Check(name=name, status="fail", detail=detail, fix=fix)


def _skip(name: str, detail: str) -> Check:
    return Check(name=name, status="skip", detail=detail)


# ------------------------------------------------------------------ checks
def _check_config(config: AkoshaSyncConfig) -> Check:
    problems = config.validate()
    if problems:
        return _fail("configuration", "; ".join(problems),
                     "correct the settings named above (akosha-sync status shows them all)")
    return _ok("configuration", "valid")


def _cloud_unused(config: AkoshaSyncConfig) -> str:
    if not config.cloud_configured:
        return "no cloud_bucket configured"
    return "" if config.should_use_cloud else "force_method is http"


def _check_credentials(config: AkoshaSyncConfig) -> Check:
    name = "credentials"
    if unused := _cloud_unused(config):
        return _skip(name, unused)
    if config.is_local_target:
        return _ok(name, "none needed for a file:// folder")
    if config.resolved_access_key_id and config.resolved_secret_access_key:
        source = "configuration" if config.access_key_id else "environment (AWS_*)"
        temporary = " with a session token" if config.resolved_session_token else ""
        return _ok(name, f"access key{temporary} from the {source}")
    return _fail(name, "no object-store credentials found",
                 "set access_key_id and secret_access_key in the config file, or "
                 "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for "
                 "temporary credentials) in the environment")


async def _check_bucket(config: AkoshaSyncConfig) -> Check:
    name = "bucket"
    if unused := _cloud_unused(config):
        return _skip(name, unused)
    if config.validate():
        return _fail(name, "not tried: the configuration is invalid",
                     "fix the configuration first")
    import obstore

    from akosha_sync.repository.store import (
        FAILED,
        RetryPolicy,
        describe_target,
        make_store,
        with_retries,
    )
    from akosha_sync.sync.protocol import CloudUploadError

    store = make_store(config)
    key = f"{PROBE_PREFIX}probe-{config.system_id_resolved}-{uuid.uuid4().hex}"
    body = b"akosha-sync doctor probe; safe to delete\n"
    policy = RetryPolicy(0, config.retry_backoff_seconds)

    async def put() -> None:
        await obstore.put_async(store, key, body, mode="create")

    async def read() -> bytes:
        return bytes(await (await obstore.get_async(store, key)).bytes_async())

    async def delete() -> None:
        await obstore.delete_async(store, key)

    step = "writing a probe object"
    try:
        with anyio.fail_after(_TIMEOUT_S * 3):
            await with_retries(put, config=config, what=step, policy=policy,
                               connect_attempts=1)
            step = "reading the probe object back"
            if await with_retries(read, config=config, what=step, policy=policy) != body:
                return _fail(name, f"the probe object {key!r} read back different bytes",
                             "check the store; it does not return what was written")
            step = "removing the probe object"
            await with_retries(delete, config=config, what=step, policy=policy)
    except CloudUploadError as exc:
        fix = _bucket_fix(str(exc))
        if step == "removing the probe object":
            fix = (f"allow deleting objects (s3:DeleteObject), then remove {key!r} by hand")
        return _fail(name, str(exc).replace(FAILED, "failed"), fix)
    except TimeoutError:
        return _fail(name, f"{describe_target(config)} did not answer in time while {step}",
                     "check cloud_endpoint and the network")
    return _ok(name, f"{describe_target(config)}: probe written, read and removed")


def _bucket_fix(message: str) -> str:
    if "credentials were refused" in message:
        return ("check access_key_id / secret_access_key (or AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY) and that the key may write to the bucket")
    if "bucket does not exist" in message:
        return "create the bucket, or correct cloud_bucket"
    if "could not connect" in message:
        return "start the store or correct cloud_endpoint"
    return "see the cause above"


async def _check_akosha(config: AkoshaSyncConfig) -> list[Check]:
    if not config.should_use_http:
        reason = "force_method is cloud" if config.force_method == "cloud" else (
            "the HTTP fallback is off (enable_fallback = false)")
        return [_skip("akosha health", reason), _skip("akosha mcp", reason)]
    from akosha_sync.sync.http import HttpSyncMethod

    shown = str(config.redacted()["akosha_url"])
    fix = (f"start Akosha, or correct akosha_url (now {shown!r}); it is the fallback "
           "when the bucket cannot be reached")
    if insecure := config.akosha_url_insecure():
        return [_fail("akosha health", insecure, "use https:// for akosha_url"),
                _skip("akosha mcp", "not tried")]
    try:
        health_url = HttpSyncMethod(config).health_url
    except ValueError:  # not a URL one can ask (validate() says why): never shown raw
        return [_fail("akosha health", f"akosha_url {shown!r} cannot be read as a URL",
                      "correct akosha_url; `akosha-sync status` lists the problems"),
                _skip("akosha mcp", "not tried")]
    headers = {"Authorization": f"Bearer {config.akosha_token}"} if config.akosha_token else {}
    try:
        async with httpx.AsyncClient(timeout=_TIMEOUT_S) as http:
            response = await http.get(health_url, headers=headers)
        data: Any = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as exc:
        return [_fail("akosha health", f"{health_url} did not answer ({type(exc).__name__})",
                      fix), _skip("akosha mcp", "not tried: Akosha is down")]
    if not isinstance(data, dict) or data.get("status") != "ok":
        return [_fail("akosha health", f"{health_url} answered {response.status_code}, "
                      "not status ok", fix), _skip("akosha mcp", "not tried")]
    return [_ok("akosha health", health_url), await _mcp_handshake(config, headers, fix)]


async def _mcp_handshake(config: AkoshaSyncConfig, headers: dict[str, str], fix: str) -> Check:
    name = "akosha mcp"
    # The MCP client is heavy; only this check needs it.
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    try:
        with anyio.fail_after(_TIMEOUT_S * 2):
            async with httpx2.AsyncClient(headers=headers, timeout=_TIMEOUT_S) as http:
                transport = streamable_http_client(config.akosha_url, http_client=http)
                async with Client(transport, read_timeout_seconds=_TIMEOUT_S,
                                  cache=None) as client:
                    tools = {t.name for t in (await client.list_tools()).tools}
    except Exception as exc:  # the SDK raises many kinds (and groups of them)
        leaf: BaseException = exc
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
            leaf = leaf.exceptions[0]  # the cause, not the task group around it
        cause = (str(leaf).strip().splitlines() or [""])[0][:300]
        return _fail(name, f"no MCP session with {config.redacted()['akosha_url']}: "
                     f"{type(leaf).__name__}: {cause}",
                     "check that akosha_url ends in Akosha's MCP path (/mcp) and, if Akosha "
                     f"requires one, akosha_token. {fix}")
    if _TOOL not in tools:
        return _fail(name, f"Akosha offers no {_TOOL} tool (found {len(tools)} tools)",
                     "upgrade Akosha to 0.11 or later")
    return _ok(name, f"handshake done, {_TOOL} offered")


def _check_daemon(config: AkoshaSyncConfig, needed: bool) -> Check:
    name = "daemon"
    from akosha_sync.server.hook import read_daemon_url

    url = read_daemon_url(config)
    try:
        response = httpx.get(f"{url}/health", timeout=_TIMEOUT_S)
        data: Any = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        if not needed:
            return _skip(name, f"not running at {url}; not needed: Claude Code starts the "
                         "stdio server and the command hook runs queued syncs itself")
        return _fail(name, f"nothing answers at {url}/health ({type(exc).__name__})",
                     "start it: akosha-sync serve --transport http (keep it running with "
                     "your service manager)")
    if not isinstance(data, dict) or data.get("service") != "akosha-sync":
        return _fail(name, f"{url} answers, but it is not akosha-sync",
                     "free daemon_port, or set another one in the config and the registration")
    return _ok(name, f"{url} (version {data.get('version')}, {data.get('queued')} queued)")


# ------------------------------------------------------------------ Claude Code
class _ClaudeSetup(msgspec.Struct, kw_only=True):
    servers: list[tuple[str, dict[str, Any]]]  # (where, entry)
    hooks: list[tuple[str, dict[str, Any]]]  # (where, hook)
    plugin: str  # where the akosha-sync plugin is enabled, or ""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _our_hook(hook: Any) -> bool:
    if not isinstance(hook, dict):
        return False
    if hook.get("type") == "http":
        return str(hook.get("url", "")).endswith(_HOOK_ROUTE)
    return hook.get("type") == "command" and "hook session-end" in str(hook.get("command", ""))


def _claude_setup(project: Path) -> _ClaudeSetup:
    """Where Claude Code would find us: the files ``install claude`` writes (user and
    project scope), the local scope ``claude mcp add`` writes, and the plugin."""
    home = Path.home()
    servers: list[tuple[str, dict[str, Any]]] = []
    user = _read_json(home / ".claude.json")
    if isinstance(user, dict):
        entry = (user.get("mcpServers") or {}).get(SERVER_NAME)
        if isinstance(entry, dict):
            servers.append((str(home / ".claude.json"), entry))
        local = ((user.get("projects") or {}).get(str(project)) or {})
        entry = (local.get("mcpServers") or {}).get(SERVER_NAME) if isinstance(local, dict) \
            else None
        if isinstance(entry, dict):
            servers.append((f"{home / '.claude.json'} (project {project})", entry))
    shared = _read_json(project / ".mcp.json")
    if isinstance(shared, dict):
        entry = (shared.get("mcpServers") or {}).get(SERVER_NAME)
        if isinstance(entry, dict):
            servers.append((str(project / ".mcp.json"), entry))
    hooks: list[tuple[str, dict[str, Any]]] = []
    plugin = ""
    for path in (home / ".claude" / "settings.json", project / ".claude" / "settings.json",
                 project / ".claude" / "settings.local.json"):
        settings = _read_json(path)
        if not isinstance(settings, dict):
            continue
        enabled = settings.get("enabledPlugins")
        if isinstance(enabled, dict) and any(
            str(k).startswith(f"{SERVER_NAME}@") and v for k, v in enabled.items()
        ):
            plugin = str(path)
        for group in (settings.get("hooks") or {}).get("SessionEnd") or []:
            for hook in (group.get("hooks") or []) if isinstance(group, dict) else []:
                if _our_hook(hook):
                    hooks.append((str(path), hook))
    return _ClaudeSetup(servers=servers, hooks=hooks, plugin=plugin)


_INSTALL_FIX = ("run: akosha-sync install claude --write (or install the akosha-sync "
                "Claude Code plugin)")


def _check_claude(config: AkoshaSyncConfig, setup: _ClaudeSetup) -> list[Check]:
    checks: list[Check] = []
    if setup.servers:
        where, entry = setup.servers[0]
        kind = entry.get("type", "stdio")
        url = str(entry.get("url", ""))
        if kind == "http" and config.daemon_token and "headers" not in entry:
            checks.append(_fail("claude code registration", f"{where}: no Authorization "
                                "header, but daemon_token is set", _INSTALL_FIX))
        elif kind == "http" and not url.startswith(f"{config.daemon_url}/"):
            checks.append(_fail("claude code registration", f"{where}: points at {url}, "
                                f"but the daemon is configured at {config.daemon_url}",
                                _INSTALL_FIX))
        else:
            checks.append(_ok("claude code registration",
                              f"{where}: {kind}{' ' + url if url else ''}"))
    elif setup.plugin:
        checks.append(_ok("claude code registration", f"plugin enabled in {setup.plugin}"))
    else:
        checks.append(_fail("claude code registration", "no mcpServers.akosha-sync in "
                            "~/.claude.json or .mcp.json, and the plugin is not enabled",
                            _INSTALL_FIX))
    if setup.hooks:
        where, hook = setup.hooks[0]
        checks.append(_ok("sessionend hook", f"{where}: {hook.get('type')} hook"))
    elif setup.plugin:
        checks.append(_ok("sessionend hook", f"from the plugin ({setup.plugin})"))
    else:
        checks.append(_fail("sessionend hook", "no SessionEnd hook of akosha-sync in "
                            "~/.claude/settings.json or .claude/settings.json", _INSTALL_FIX))
    return checks


def _daemon_needed(setup: _ClaudeSetup) -> bool:
    """The daemon is needed unless Claude Code uses only the stdio server and the
    command hook (which drains queued syncs itself)."""
    if not setup.servers and not setup.hooks:
        return not setup.plugin
    uses_http = any(e.get("type") in ("http", "sse") for _, e in setup.servers) or any(
        h.get("type") == "http" for _, h in setup.hooks)
    return uses_http


# ------------------------------------------------------------------ running
async def run_checks(config: AkoshaSyncConfig, *, project: Path | None = None) -> list[Check]:
    """Every check, in the order a user would fix them."""
    setup = _claude_setup((project or Path.cwd()).resolve())
    checks = [_check_config(config), _check_credentials(config), await _check_bucket(config)]
    checks += await _check_akosha(config)
    checks.append(await anyio.to_thread.run_sync(_check_daemon, config, _daemon_needed(setup)))
    checks += _check_claude(config, setup)
    scrubber = scrubber_for(config)
    return [msgspec.structs.replace(c, detail=scrubber.text(c.detail), fix=scrubber.text(c.fix))
            for c in checks]


def run_doctor(config: AkoshaSyncConfig, *, as_json: bool = False) -> int:
    """Print the checks; 0 when none failed, 1 otherwise."""
    from akosha_sync.logs import configure_logging

    configure_logging(config, stderr_level=None)  # stdout carries the report only
    started = time.monotonic()
    checks = anyio.run(run_checks, config)
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        print(json.dumps({
            "ok": not failed, "host": socket.gethostname(),
            "seconds": round(time.monotonic() - started, 2),
            "checks": [msgspec.structs.asdict(c) for c in checks],
        }, indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            fix = f" -> fix: {c.fix}" if c.status == "fail" else ""
            print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}{fix}")
        print(f"{len(failed)} of {len(checks)} checks failed" if failed else
              "all checks passed")
    return 1 if failed else 0
