"""``akosha-sync install|uninstall claude|service``.

``claude``: the MCP registration and the SessionEnd/PreCompact hooks for Claude Code,
printed, or merged into its files with ``--write``. The default mode registers a
stdio server and ``command`` hooks: the hook forwards to a running daemon, else
queues the request durably and starts a detached drain, so no session end is lost
whatever runs. ``--mode http`` registers the daemon's URL and ``http`` hooks (for a
daemon kept running as a service).

``service``: a systemd user unit (Linux) or a launchd agent (macOS) that keeps
``akosha-sync serve --transport http`` running.

Uninstall removes exactly what install added: other servers, hooks and settings in
the same files stay, and a file we rewrite keeps its mode, indentation and final
newline, so untouched content stays byte for byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import plistlib
import re
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Literal

from akosha_sync._fs import private_dir
from akosha_sync.config import ENV_PREFIXES, AkoshaSyncConfig

__all__ = [
    "HOOK_EVENTS",
    "LAUNCHD_LABEL",
    "SERVER_NAME",
    "SYSTEMD_UNIT",
    "InstallError",
    "claude_entries",
    "install_claude",
    "install_service",
    "service_path",
    "uninstall_claude",
    "uninstall_service",
]

Mode = Literal["stdio", "http"]
Platform = Literal["linux", "macos"]

SERVER_NAME = "akosha-sync"
# Claude Code hook event -> the argument of ``akosha-sync hook``.
HOOK_EVENTS = {"SessionEnd": "session-end", "PreCompact": "pre-compact"}
SYSTEMD_UNIT = "akosha-sync.service"
LAUNCHD_LABEL = "dev.akosha-sync.daemon"
_UNIT_MARKER = "# Written by `akosha-sync install service`"
_HOOK_ROUTE = "/hooks/session-end"
_OUR_COMMAND = re.compile(r"akosha[-_]sync\S*(?:\s.*)?\shook\s+(?:session-end|pre-compact)\s*$")
_BACKUPS_KEPT = 5
_TOKEN_VAR = "AKOSHA_SYNC_DAEMON_TOKEN"  # noqa: S105 - a variable name, not a secret


class InstallError(ValueError):
    """A file install/uninstall must not touch as it is; the message says what to do."""


# ------------------------------------------------------------------ the command
def _command() -> list[str]:
    """How to run this very installation of akosha-sync, as an absolute command."""
    beside = Path(sys.executable).with_name("akosha-sync")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    exe = shutil.which("akosha-sync")
    return [exe] if exe else [sys.executable, "-m", "akosha_sync"]


def _config_args(config_path: str | None) -> list[str]:
    path = config_path or os.environ.get("AKOSHA_SYNC_CONFIG")
    return ["--config", str(Path(path).expanduser().resolve())] if path else []


# ------------------------------------------------------------------ claude
def claude_entries(
    config: AkoshaSyncConfig, *, mode: Mode, config_path: str | None = None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the mcpServers entry, {hook event: hook group}) for this configuration."""
    base = _command()
    extra = _config_args(config_path)
    groups: dict[str, dict[str, Any]] = {}
    if mode == "http":
        server: dict[str, Any] = {"type": "http", "url": f"{config.daemon_url}/mcp"}
        for event in HOOK_EVENTS:
            hook: dict[str, Any] = {
                "type": "http", "url": f"{config.daemon_url}{_HOOK_ROUTE}", "timeout": 5,
            }
            if config.daemon_token:
                # The token stays in the environment, never in the settings file.
                hook["headers"] = {"Authorization": "Bearer $AKOSHA_SYNC_DAEMON_TOKEN"}
                hook["allowedEnvVars"] = ["AKOSHA_SYNC_DAEMON_TOKEN"]
            groups[event] = {"hooks": [hook]}
        if config.daemon_token:
            server["headers"] = {"Authorization": "Bearer ${AKOSHA_SYNC_DAEMON_TOKEN}"}
    else:
        server = {"type": "stdio", "command": base[0],
                  "args": [*base[1:], *extra, "serve", "--transport", "stdio"]}
        for event, name in HOOK_EVENTS.items():
            groups[event] = {"hooks": [{
                "type": "command",
                "command": shlex.join([*base, *extra, "hook", name]),
                "timeout": 5,
            }]}
    return server, groups


def _claude_paths(scope: str) -> tuple[Path, Path]:
    if scope == "project":
        return Path(".mcp.json"), Path(".claude") / "settings.json"
    home = Path.home()
    return home / ".claude.json", home / ".claude" / "settings.json"


def _is_our_hook(hook: Any) -> bool:
    if not isinstance(hook, dict):
        return False
    if hook.get("type") == "command":
        return bool(_OUR_COMMAND.search(str(hook.get("command", ""))))
    if hook.get("type") == "http":
        return str(hook.get("url", "")).endswith(_HOOK_ROUTE)
    return False


def _without_ours(groups: list[Any]) -> list[Any]:
    """The hook groups with our hooks taken out (a group left empty goes too)."""
    kept: list[Any] = []
    for group in groups:
        hooks = group.get("hooks") if isinstance(group, dict) else None
        if not isinstance(hooks, list) or not any(_is_our_hook(h) for h in hooks):
            kept.append(group)
            continue
        rest = [h for h in hooks if not _is_our_hook(h)]
        if rest:
            kept.append({**group, "hooks": rest})
    return kept


def install_claude(
    config: AkoshaSyncConfig, *, mode: Mode, scope: str, write: bool,
    config_path: str | None = None,
) -> int:
    server, groups = claude_entries(config, mode=mode, config_path=config_path)
    mcp_path, settings_path = _claude_paths(scope)
    print(f"MCP registration ({mcp_path}, key mcpServers.{SERVER_NAME}):")
    print(json.dumps({"mcpServers": {SERVER_NAME: server}}, indent=2))
    print(f"\nSessionEnd and PreCompact hooks ({settings_path}):")
    print(json.dumps({"hooks": {event: [g] for event, g in groups.items()}}, indent=2))
    cli_scope = "user" if scope == "user" else "project"
    print("\nOr with the claude CLI:")
    print(f"  claude mcp add-json -s {cli_scope} {SERVER_NAME} {shlex.quote(json.dumps(server))}")
    if mode == "http":
        print("\nThe http mode needs the daemon running: akosha-sync install service, or "
              "akosha-sync serve --transport http")
        if config.daemon_token and not os.environ.get(_TOKEN_VAR):
            # Claude Code expands the variable from its own environment, not our file.
            print(f"\nWarning: the entries send the daemon token from the environment "
                  f"variable {_TOKEN_VAR}, which is not set here (the token comes from "
                  "the configuration). Export it, with that value, where Claude Code "
                  "starts (your shell profile), or the daemon refuses every hook and tool "
                  "call with 401.")
    settings = _JsonFile.load(settings_path)
    plugins = settings.data.get("enabledPlugins")
    if isinstance(plugins, dict) and any(
        str(k).startswith(f"{SERVER_NAME}@") and v for k, v in plugins.items()
    ):
        print(f"\nNote: the {SERVER_NAME} Claude Code plugin is enabled in {settings_path}; "
              "it already registers the server and the hooks, so this is not needed "
              "(both would run each hook twice).")
    if not write:
        print("\nNothing was changed; run again with --write to apply.")
        return 0
    backups = config.state_path / "backups"
    mcp = _JsonFile.load(mcp_path)
    mcp.data.setdefault("mcpServers", {})[SERVER_NAME] = server
    hooks = settings.data.setdefault("hooks", {})
    for event, group in groups.items():
        hooks[event] = [*_without_ours(hooks.get(event, [])), group]
    for file in (mcp, settings):
        if file.changed():  # installing twice changes nothing, not even a backup
            file.save(backups)
    print(f"\nWritten: {mcp_path} and {settings_path} (backups in {backups}).")
    print("Undo with: akosha-sync uninstall claude --write"
          + (" --scope project" if scope == "project" else ""))
    return 0


def uninstall_claude(config: AkoshaSyncConfig, *, scope: str, write: bool) -> int:
    mcp_path, settings_path = _claude_paths(scope)
    backups = config.state_path / "backups"
    changed: list[str] = []

    mcp = _JsonFile.load(mcp_path)
    servers = mcp.data.get("mcpServers")
    if isinstance(servers, dict) and SERVER_NAME in servers:
        del servers[SERVER_NAME]
        if not servers:
            del mcp.data["mcpServers"]
        changed.append(f"{mcp_path}: mcpServers.{SERVER_NAME}")
    settings = _JsonFile.load(settings_path)
    hooks = settings.data.get("hooks")
    if isinstance(hooks, dict):
        for event in HOOK_EVENTS:
            groups = hooks.get(event)
            if not isinstance(groups, list):
                continue
            kept = _without_ours(groups)
            if kept == groups:
                continue
            changed.append(f"{settings_path}: hooks.{event} (akosha-sync's hook)")
            if kept:
                hooks[event] = kept
            else:
                del hooks[event]
        if not hooks:
            del settings.data["hooks"]
    if not changed:
        print(f"Nothing of akosha-sync's in {mcp_path} or {settings_path}.")
        return 0
    print("akosha-sync entries" + (" removed:" if write else " to remove:"))
    for line in changed:
        print(f"  {line}")
    if not write:
        print("\nNothing was changed; run again with --write to apply.")
        return 0
    for file in (mcp, settings):
        if file.changed():
            file.save(backups)
    print(f"(backups in {backups})")
    return 0


class _JsonFile:
    """A JSON object file, rewritten in its own style (indent, final newline, mode)."""

    def __init__(self, path: Path, text: str | None) -> None:
        # Write through a symlink (dotfile managers), not over it.
        self.path = Path(os.path.realpath(path)) if path.is_symlink() else path
        self.text = text
        self.data: dict[str, Any] = {}
        if text is not None and text.strip():
            data = json.loads(text)
            if not isinstance(data, dict):
                raise InstallError(f"{path} does not hold a JSON object; fix or move it, "
                                 "then run again")
            self.data = data
        self.original = json.dumps(self.data, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> _JsonFile:
        try:
            return cls(path, path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls(path, None)
        except json.JSONDecodeError as exc:
            raise InstallError(f"{path} is not valid JSON ({exc}); fix it, then run again") \
                from exc

    def changed(self) -> bool:
        return json.dumps(self.data, sort_keys=True) != self.original

    def _render(self) -> str:
        text = self.text or ""
        match = re.search(r"^[ \t]+(?=\S)", text, re.MULTILINE)
        indent: str | int = match.group(0) if match else 2
        newline = "\n" if self.text is None or text.endswith("\n") else ""
        return json.dumps(self.data, indent=indent, ensure_ascii=False) + newline

    def save(self, backups: Path) -> None:
        path = self.path
        mode = 0o600
        if self.text is not None:
            mode = path.stat().st_mode & 0o7777  # keep it: ~/.claude.json is often 0600
            _backup(path, self.text, backups, mode)
        earlier = self._earlier_text(backups)
        if earlier is None and self.text is not None and not self.data and self.changed():
            # Everything in it was ours: install created it, so it goes (with the
            # folder it needed, e.g. a project's .claude/, if nothing else is in it).
            path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, self._render() if earlier is None else earlier, mode)

    def _earlier_text(self, backups: Path) -> str | None:
        """An earlier version's exact text when it holds the same data (uninstall after
        install gives back the very bytes, whatever their formatting)."""
        for old in sorted(backups.glob(f"{_backup_name(self.path)}.*"), reverse=True):
            try:
                text = old.read_text(encoding="utf-8")
                if json.loads(text) == self.data:
                    return text
            except (OSError, ValueError):
                continue
        return None


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.akosha-sync.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask does not get a say
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            fd = -1
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _backup_name(path: Path) -> str:
    """Per file: a user's and a project's settings.json must not share backups."""
    where = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:8]
    return f"{path.name.lstrip('.') or 'file'}.{where}"


def _backup(path: Path, text: str, backups: Path, mode: int) -> None:
    private_dir(backups)
    name = _backup_name(path)
    now = time.time_ns()
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now // 10**9))}-{now % 10**9:09d}"
    _write_atomic(backups / f"{name}.{stamp}", text, mode & 0o600)
    for old in sorted(backups.glob(f"{name}.*"))[:-_BACKUPS_KEPT]:
        old.unlink(missing_ok=True)


# ------------------------------------------------------------------ service
def _platform(forced: str | None) -> Platform:
    if forced in ("linux", "macos"):
        return forced  # type: ignore[return-value]
    if sys.platform == "darwin":
        return "macos"
    if sys.platform.startswith("linux"):
        return "linux"
    raise InstallError(f"no service manager support on {sys.platform}; run "
                     "`akosha-sync serve --transport http` at login (e.g. from Task Scheduler)")


def service_path(platform: Platform) -> Path:
    """Where the unit (systemd) or agent (launchd) file goes."""
    if platform == "macos":
        return Path.home() / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / SYSTEMD_UNIT


def _service_argv(config_path: str | None) -> list[str]:
    return [*_command(), *_config_args(config_path), "serve", "--transport", "http"]


def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%").replace("$", "$$")
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_unit(config: AkoshaSyncConfig, config_path: str | None) -> str:
    exec_start = " ".join(_systemd_quote(a) for a in _service_argv(config_path))
    return (
        f"{_UNIT_MARKER}; `akosha-sync uninstall service --write` removes it.\n"
        "[Unit]\n"
        "Description=akosha-sync daemon: ships Session-Buddy's memory databases to S3 or Akosha\n"
        "\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={exec_start}\n"
        "Restart=on-failure\n"
        "RestartSec=5\n"
        "# A running sync gets 10 s to finish at stop.\n"
        "TimeoutStopSec=30\n"
        f"# Log: {_systemd_quote(str(config.log_path))} (as `akosha-sync status` says); "
        "start-up errors: journalctl --user -u akosha-sync\n"
        "\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


def _launchd_plist(config: AkoshaSyncConfig, config_path: str | None) -> str:
    errors = config.log_path.with_name("akosha-sync.stderr.log")
    agent = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": _service_argv(config_path),
        "RunAtLoad": True,
        # Restart when it exits with an error, not after a clean stop.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 5,
        "StandardOutPath": str(errors),
        "StandardErrorPath": str(errors),
    }
    return plistlib.dumps(agent).decode("utf-8")


def _env_settings_warning() -> list[str]:
    """Settings the user's shell has but a service would not see (names only)."""
    names = sorted(
        name for name in os.environ
        if name.startswith(ENV_PREFIXES) and name != "AKOSHA_SYNC_CONFIG"
    )
    names += [n for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
              if n in os.environ]
    if not names:
        return []
    return [f"Note: the service does not see this shell's {', '.join(names)}; put those "
            "settings in the config file (e.g. ~/.config/akosha-sync/config.toml)."]


def install_service(
    config: AkoshaSyncConfig, *, platform: str | None, write: bool,
    config_path: str | None = None,
) -> int:
    kind = _platform(platform)
    path = service_path(kind)
    text = (_systemd_unit(config, config_path) if kind == "linux"
            else _launchd_plist(config, config_path))
    print(f"{'systemd user unit' if kind == 'linux' else 'launchd agent'} ({path}):\n")
    print(text)
    for line in _env_settings_warning():
        print(line)
    if path.exists() and not _is_our_service(path, kind):
        raise InstallError(f"{path} exists and was not written by akosha-sync; move it away, "
                         "then run again")
    if not write:
        print("Nothing was changed; run again with --write to apply.")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, text, 0o644)
    print(f"Written: {path}\nEnable and start it with:")
    if kind == "linux":
        print("  systemctl --user daemon-reload\n"
              f"  systemctl --user enable --now {SYSTEMD_UNIT}\n"
              "  loginctl enable-linger \"$USER\"   # optional: run also while logged out")
    else:
        print(f"  launchctl bootstrap gui/$(id -u) {shlex.quote(str(path))}")
    print("Then use the daemon from Claude Code: akosha-sync install claude --mode http --write")
    return 0


def _is_our_service(path: Path, kind: Platform) -> bool:
    try:
        if kind == "linux":
            return path.read_text(encoding="utf-8").startswith(_UNIT_MARKER)
        return bool(plistlib.loads(path.read_bytes()).get("Label") == LAUNCHD_LABEL)
    except (OSError, ValueError, plistlib.InvalidFileException):
        return False


def uninstall_service(*, platform: str | None, write: bool) -> int:
    kind = _platform(platform)
    path = service_path(kind)
    if not path.exists():
        print(f"No akosha-sync service file at {path}.")
        return 0
    if not _is_our_service(path, kind):
        raise InstallError(f"{path} was not written by akosha-sync; left as it is")
    print("Stop it first with:")
    if kind == "linux":
        print(f"  systemctl --user disable --now {SYSTEMD_UNIT}")
    else:
        print(f"  launchctl bootout gui/$(id -u)/{LAUNCHD_LABEL}")
    if not write:
        print(f"Would remove {path}; run again with --write to apply.")
        return 0
    path.unlink()
    print(f"Removed {path}.")
    return 0
