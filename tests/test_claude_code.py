"""Against a real Claude Code 2.1 (npm, cached by scripts/build-claude-code.sh) in a
sandboxed HOME with no login: the plugin in this checkout, ``install claude`` and
``uninstall claude``. Uploads land in the real SeaweedFS and are read back with the
minio client. Where Claude Code cannot be installed these tests fail, never skip."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from minio import Minio

from akosha_sync import __version__
from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.queue import JobQueue
from support.claude_code import ROOT, ClaudeSandbox, claude_executable, until
from support.process import pick_free_port
from support.verify import get_object, manifests

MakeConfig = Callable[..., AkoshaSyncConfig]
PLUGIN = ROOT / "plugin"


@pytest.fixture(scope="session")
def claude_exe() -> Path:
    return claude_executable()


@pytest.fixture
def sandbox(claude_exe: Path, tmp_path: Path, s3_config: MakeConfig) -> ClaudeSandbox:
    # A port nothing listens on: a daemon of the developer's never takes the hook.
    config = s3_config(daemon_port=pick_free_port())
    return ClaudeSandbox(claude_exe, tmp_path / "home", config)


def _no_daemon_running(config: AkoshaSyncConfig) -> None:
    assert not (config.state_path / "daemon.json").exists()
    with socket.socket() as sock:
        assert sock.connect_ex((config.daemon_host, config.daemon_port)) != 0


def _session_end_upload(sandbox: ClaudeSandbox, minio: Minio, bucket: str) -> dict[str, object]:
    """Run ``claude -p hi`` (no login: it fails, then ends the session) and wait for the
    upload its SessionEnd hook leads to; returns the upload's manifest."""
    _no_daemon_running(sandbox.config)
    assert manifests(minio, bucket) == []
    done = sandbox.claude("-p", "hi")
    assert "login" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    keys = until(lambda: manifests(minio, bucket), timeout=90, what="the session-end upload")
    assert len(keys) == 1
    queue = JobQueue(sandbox.config.state_path)
    history = until(lambda: queue.history(5), what="the sync's history entry")
    assert history[0]["triggered_by"] == "session-end" and history[0]["success"], history
    manifest: dict[str, object] = json.loads(get_object(minio, bucket, keys[0]))
    return manifest


def test_plugin_and_marketplace_validate_strictly(claude_exe: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path), "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    for target in (PLUGIN, ROOT):
        done = subprocess.run([str(claude_exe), "plugin", "validate", "--strict", "--json",
                               str(target)], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout)["success"] is True
    provides = json.loads(subprocess.run(
        [str(claude_exe), "plugin", "validate", "--json", str(PLUGIN)], capture_output=True,
        text=True, env=env, timeout=60, check=True).stdout)["provides"]
    assert {(h["event"], h["type"], h["command"]) for h in provides["hooks"]} == {
        ("SessionEnd", "command", "akosha-sync hook session-end"),
        ("PreCompact", "command", "akosha-sync hook pre-compact"),
    }
    assert [(s["type"], s["target"], s["args"]) for s in provides["mcpServers"]] == [
        ("stdio", "akosha-sync", ["serve", "--transport", "stdio"])]
    assert (PLUGIN / "README.md").is_file() and (PLUGIN / "LICENSE").is_file()
    # One version everywhere: the package, the plugin and its marketplace entry.
    plugin = json.loads((PLUGIN / ".claude-plugin" / "plugin.json").read_text())
    market = json.loads((ROOT / ".claude-plugin" / "marketplace.json").read_text())
    assert [p["version"] for p in market["plugins"]] == [plugin["version"]] == [__version__]


def test_plugin_installed_from_this_checkout_uploads_at_session_end(
    sandbox: ClaudeSandbox, minio_client: Minio, s3_bucket: str
) -> None:
    added = sandbox.claude("plugin", "marketplace", "add", str(ROOT))
    assert added.returncode == 0, added.stdout + added.stderr
    installed = sandbox.claude("plugin", "install", "akosha-sync@akosha-sync")
    assert installed.returncode == 0, installed.stdout + installed.stderr
    listed = sandbox.claude("mcp", "list")
    line = next((x for x in listed.stdout.splitlines() if "akosha-sync" in x), "")
    assert line.startswith("plugin:akosha-sync:akosha-sync") and "Connected" in line, \
        listed.stdout + listed.stderr
    manifest = _session_end_upload(sandbox, minio_client, s3_bucket)
    assert manifest["system_id"] == sandbox.config.system_id
    # `install claude` on top would run every hook twice: it says so.
    assert "plugin is enabled" in sandbox.akosha_sync("install", "claude").stdout


def test_plugin_pre_compact_hook_syncs(
    sandbox: ClaudeSandbox, minio_client: Minio, s3_bucket: str
) -> None:
    """Claude Code cannot compact without a login, so the plugin's own PreCompact
    command is run as Claude Code runs it: through a shell, the hook JSON on stdin."""
    hooks = json.loads((PLUGIN / ".claude-plugin" / "plugin.json").read_text())["hooks"]
    command = hooks["PreCompact"][0]["hooks"][0]["command"]
    payload = {"session_id": "s-compact", "transcript_path": "/tmp/t.jsonl",
               "cwd": str(sandbox.project), "hook_event_name": "PreCompact",
               "trigger": "auto", "custom_instructions": ""}
    _no_daemon_running(sandbox.config)
    done = subprocess.run(command, shell=True, input=json.dumps(payload), text=True,  # noqa: S602
                          env=sandbox.env, cwd=sandbox.project, capture_output=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    until(lambda: manifests(minio_client, s3_bucket), what="the pre-compact upload")
    queue = JobQueue(sandbox.config.state_path)
    history = until(lambda: queue.history(5), what="the sync's history entry")
    assert history[0]["triggered_by"] == "pre-compact" and history[0]["success"], history


def test_install_claude_default_mode_uploads_at_session_end(
    sandbox: ClaudeSandbox, minio_client: Minio, s3_bucket: str
) -> None:
    done = sandbox.akosha_sync("install", "claude", "--write")
    assert done.returncode == 0, done.stderr
    settings = json.loads((sandbox.home / ".claude" / "settings.json").read_text())
    assert [g["hooks"][0]["type"] for g in settings["hooks"]["SessionEnd"]] == ["command"]
    listed = sandbox.claude("mcp", "list")
    assert any(x.startswith("akosha-sync:") and "Connected" in x
               for x in listed.stdout.splitlines()), listed.stdout + listed.stderr
    _session_end_upload(sandbox, minio_client, s3_bucket)

    # Claude Code has rewritten ~/.claude.json meanwhile; uninstall still takes only ours.
    done = sandbox.akosha_sync("uninstall", "claude", "--write")
    assert done.returncode == 0, done.stderr
    claude_json = json.loads((sandbox.home / ".claude.json").read_text())
    assert "akosha-sync" not in claude_json.get("mcpServers", {})
    assert "akosha-sync" not in sandbox.claude("mcp", "list").stdout
    assert not (sandbox.home / ".claude" / "settings.json").exists()  # install created it


def _snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int] | None]:
    return {p: (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) if p.exists() else None
            for p in paths}


def test_uninstall_claude_restores_the_files_as_they_were(sandbox: ClaudeSandbox) -> None:
    # What a user already has, written by Claude Code itself, plus a hand-formatted hook.
    for args in (("mcp", "add", "-s", "user", "other", "--", "echo", "hi"),
                 ("mcp", "add", "-s", "project", "shared", "--", "echo", "hi"),
                 ("plugin", "marketplace", "add", str(ROOT))):
        done = sandbox.claude(*args)
        assert done.returncode == 0, done.stdout + done.stderr
    settings_path = sandbox.home / ".claude" / "settings.json"
    settings = json.loads(settings_path.read_text())
    settings["hooks"] = {"SessionEnd": [{"matcher": "clear",
                                         "hooks": [{"type": "command", "command": "echo bye"}]}]}
    settings_path.write_text(json.dumps(settings, indent=4) + "\n\n")
    (sandbox.home / ".claude.json").chmod(0o600)
    project_settings = sandbox.project / ".claude" / "settings.json"
    files = [sandbox.home / ".claude.json", settings_path,
             sandbox.project / ".mcp.json", project_settings]
    before = _snapshot(files)
    assert before[project_settings] is None

    for scope in ("user", "project"):
        done = sandbox.akosha_sync("install", "claude", "--scope", scope, "--write")
        assert done.returncode == 0, done.stderr
    during = _snapshot(files)
    assert all(during[p] != before[p] for p in files)
    assert json.loads(settings_path.read_text())["hooks"]["SessionEnd"][0] == \
        settings["hooks"]["SessionEnd"][0]
    for scope in ("user", "project"):
        done = sandbox.akosha_sync("uninstall", "claude", "--scope", scope, "--write")
        assert done.returncode == 0, done.stderr
    assert _snapshot(files) == before
    # Claude Code still reads them: the other servers are there, ours is gone.
    listed = sandbox.claude("mcp", "list").stdout
    assert "other:" in listed and "akosha-sync" not in listed
