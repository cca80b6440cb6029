"""``akosha-sync install claude``: the MCP registration and the SessionEnd hook for
Claude Code, printed, or merged into its files with ``--write``."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from akosha_sync.config import AkoshaSyncConfig

__all__ = ["claude_entries", "install_claude"]

SERVER_NAME = "akosha-sync"


def _command() -> list[str]:
    exe = shutil.which("akosha-sync")
    return [exe] if exe else [sys.executable, "-m", "akosha_sync"]


def claude_entries(
    config: AkoshaSyncConfig, *, mode: str, config_path: str | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the mcpServers entry, the SessionEnd hook group) for this configuration."""
    base = _command()
    extra = ["--config", config_path] if config_path else []
    if mode == "http":
        server: dict[str, Any] = {"type": "http", "url": f"{config.daemon_url}/mcp"}
        hook: dict[str, Any] = {
            "type": "http",
            "url": f"{config.daemon_url}/hooks/session-end",
            "timeout": 5,
        }
        if config.daemon_token:
            # The token stays in the environment, never in the settings file.
            server["headers"] = {"Authorization": "Bearer ${AKOSHA_SYNC_DAEMON_TOKEN}"}
            hook["headers"] = {"Authorization": "Bearer $AKOSHA_SYNC_DAEMON_TOKEN"}
            hook["allowedEnvVars"] = ["AKOSHA_SYNC_DAEMON_TOKEN"]
    else:
        server = {"type": "stdio", "command": base[0],
                  "args": [*base[1:], *extra, "serve", "--transport", "stdio"]}
        hook = {"type": "command",
                "command": shlex.join([*base, *extra, "hook", "session-end"]),
                "timeout": 5}
    return server, {"hooks": [hook]}


def _paths(scope: str) -> tuple[Path, Path]:
    if scope == "project":
        return Path(".mcp.json"), Path(".claude") / "settings.json"
    home = Path.home()
    return home / ".claude.json", home / ".claude" / "settings.json"


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.copy2(path, path.with_name(f"{path.name}.bak-{time.strftime('%Y%m%d%H%M%S')}"))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def _is_ours(group: Any) -> bool:
    text = json.dumps(group)
    return "/hooks/session-end" in text or "hook session-end" in text


def install_claude(
    config: AkoshaSyncConfig, *, mode: str, scope: str, write: bool,
    config_path: str | None = None,
) -> int:
    server, hook_group = claude_entries(config, mode=mode, config_path=config_path)
    mcp_path, settings_path = _paths(scope)
    print(f"MCP registration ({mcp_path}, key mcpServers.{SERVER_NAME}):")
    print(json.dumps({"mcpServers": {SERVER_NAME: server}}, indent=2))
    print(f"\nSessionEnd hook ({settings_path}):")
    print(json.dumps({"hooks": {"SessionEnd": [hook_group]}}, indent=2))
    cli_scope = "user" if scope == "user" else "project"
    print("\nOr with the claude CLI:")
    print(f"  claude mcp add-json -s {cli_scope} {SERVER_NAME} {shlex.quote(json.dumps(server))}")
    if mode == "http":
        print("\nThe http mode needs the daemon running: akosha-sync serve --transport http")
    if not write:
        print("\nNothing was changed; run again with --write to apply.")
        return 0
    mcp_data = _load(mcp_path)
    mcp_data.setdefault("mcpServers", {})[SERVER_NAME] = server
    _save(mcp_path, mcp_data)
    settings = _load(settings_path)
    groups = settings.setdefault("hooks", {}).setdefault("SessionEnd", [])
    groups[:] = [g for g in groups if not _is_ours(g)] + [hook_group]
    _save(settings_path, settings)
    print(f"\nWritten: {mcp_path} and {settings_path} (backups kept beside them).")
    return 0
