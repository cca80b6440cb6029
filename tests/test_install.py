"""``install`` / ``uninstall`` without Claude Code: file modes, the service files,
and the daemon's URL on IPv6 (which the hook command must be able to reach)."""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import shlex
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from support.claude_code import until, write_toml
from support.process import parent_death_preexec, pick_free_port
from support.verify import manifests

MakeConfig = Callable[..., AkoshaSyncConfig]
EXE = str(Path(sys.executable).with_name("akosha-sync"))


def _run(home: Path, *args: str, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
                **(env or {})}
    return subprocess.run([EXE, *args], env=full_env, capture_output=True, text=True,
                          timeout=60, check=check, umask=0o022)


def test_install_claude_prints_command_hooks_by_default(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    toml = write_toml(make_config(), tmp_path / "c.toml")
    shown = _run(tmp_path / "home", "--config", str(toml), "install", "claude").stdout
    hooks = json.loads(shown[shown.index('{\n  "hooks"'):shown.index("\n}\n", shown.index(
        '{\n  "hooks"')) + 2])["hooks"]
    assert set(hooks) == {"SessionEnd", "PreCompact"}
    for event, name in (("SessionEnd", "session-end"), ("PreCompact", "pre-compact")):
        hook = hooks[event][0]["hooks"][0]
        assert hook["type"] == "command"
        assert shlex.split(hook["command"]) == [EXE, "--config", str(toml), "hook", name]
    assert not (tmp_path / "home" / ".claude.json").exists()


def test_install_claude_keeps_the_mode_of_the_files_it_rewrites(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    claude_json, settings = home / ".claude.json", home / ".claude" / "settings.json"
    claude_json.write_text('{"numStartups": 3}')
    claude_json.chmod(0o600)
    settings.write_text("{}\n")
    settings.chmod(0o640)
    toml = write_toml(make_config(), tmp_path / "c.toml")
    for command in ("install", "uninstall"):
        _run(home, "--config", str(toml), command, "claude", "--write")
        assert stat.S_IMODE(claude_json.stat().st_mode) == 0o600, command
        assert stat.S_IMODE(settings.stat().st_mode) == 0o640, command
    assert claude_json.read_text() == '{"numStartups": 3}'


def test_install_claude_writes_through_a_symlink(tmp_path: Path, make_config: MakeConfig) -> None:
    home = tmp_path / "home"
    real = tmp_path / "dotfiles" / "claude.json"
    real.parent.mkdir()
    real.write_text("{}")
    home.mkdir()
    (home / ".claude.json").symlink_to(real)
    _run(home, "--config", str(write_toml(make_config(), tmp_path / "c.toml")),
         "install", "claude", "--write")
    assert (home / ".claude.json").is_symlink()
    assert "akosha-sync" in json.loads(real.read_text())["mcpServers"]


def test_uninstall_claude_leaves_a_foreign_hook_and_reports_nothing_to_do(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    home = tmp_path / "home"
    settings = home / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    text = json.dumps({"hooks": {"SessionEnd": [{"hooks": [
        {"type": "command", "command": "my-backup hook session-end"}]}]}})
    settings.write_text(text)
    toml = str(write_toml(make_config(), tmp_path / "c.toml"))
    done = _run(home, "--config", toml, "uninstall", "claude", "--write")
    assert "Nothing of akosha-sync's" in done.stdout
    assert settings.read_text() == text


def _unit(home: Path) -> Path:
    return home / ".config" / "systemd" / "user" / "akosha-sync.service"


def test_install_service_systemd_unit(tmp_path: Path, make_config: MakeConfig) -> None:
    home = tmp_path / "home"
    config = make_config()
    toml = write_toml(config, tmp_path / "my config.toml")  # a space: quoting matters
    shown = _run(home, "--config", str(toml), "install", "service", "--platform", "linux",
                 env={"AKOSHA_SYNC_CLOUD_BUCKET": "secret-looking-bucket"})
    assert "[Service]" in shown.stdout and "--write" in shown.stdout
    assert "AKOSHA_SYNC_CLOUD_BUCKET" in shown.stdout  # named: the service will not see it
    assert "secret-looking-bucket" not in shown.stdout
    assert not _unit(home).exists()

    done = _run(home, "--config", str(toml), "install", "service", "--platform", "linux",
                "--write")
    assert "systemctl --user enable --now akosha-sync.service" in done.stdout
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(_unit(home).read_text())
    service = parser["Service"]
    assert shlex.split(service["ExecStart"]) == [
        EXE, "--config", str(toml), "serve", "--transport", "http"]
    assert service["Restart"] == "on-failure"
    assert parser["Install"]["WantedBy"] == "default.target"
    assert str(config.log_path) in _unit(home).read_text()  # where `status` says the log is

    assert "Would remove" in _run(home, "uninstall", "service", "--platform", "linux").stdout
    assert _unit(home).exists()
    _run(home, "uninstall", "service", "--platform", "linux", "--write")
    assert not _unit(home).exists()


def test_service_files_of_someone_else_are_left_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _unit(home).parent.mkdir(parents=True)
    _unit(home).write_text("[Service]\nExecStart=/usr/bin/true\n")
    for command in ("install", "uninstall"):
        done = _run(home, command, "service", "--platform", "linux", "--write", check=False)
        assert done.returncode == 2 and "not written by akosha-sync" in done.stderr, command
        assert _unit(home).read_text() == "[Service]\nExecStart=/usr/bin/true\n"


def test_install_service_launchd_agent(tmp_path: Path, make_config: MakeConfig) -> None:
    home = tmp_path / "home"
    toml = write_toml(make_config(), tmp_path / "c.toml")
    done = _run(home, "--config", str(toml), "install", "service", "--platform", "macos",
                "--write")
    path = home / "Library" / "LaunchAgents" / "dev.akosha-sync.daemon.plist"
    assert f"launchctl bootstrap gui/$(id -u) {path}" in done.stdout
    agent = plistlib.loads(path.read_bytes())
    assert agent["Label"] == "dev.akosha-sync.daemon"
    assert agent["ProgramArguments"] == [EXE, "--config", str(toml), "serve", "--transport",
                                         "http"]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    _run(home, "uninstall", "service", "--platform", "macos", "--write")
    assert not path.exists()


def test_daemon_on_ipv6_is_reachable_by_the_hook_command(
    tmp_path: Path, s3_config: MakeConfig
) -> None:
    config = s3_config(daemon_host="::1", upload_on_session_end=True)
    toml = write_toml(config, tmp_path / "c.toml")
    err = (tmp_path / "daemon.err").open("ab")
    daemon = subprocess.Popen(
        [EXE, "--config", str(toml), "serve", "--transport", "http", "--port", "0",
         "--grace", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        preexec_fn=parent_death_preexec(),
    )
    try:
        info_path = config.state_path / "daemon.json"
        info = until(lambda: info_path.exists() and json.loads(info_path.read_text()),
                     what="the daemon file")
        assert info["url"].startswith("http://[::1]:"), info
        payload = {"session_id": "s-v6", "hook_event_name": "SessionEnd", "reason": "other"}
        done = subprocess.run([EXE, "--config", str(toml), "hook", "session-end"],
                              input=json.dumps(payload), capture_output=True, text=True,
                              timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        # Only the daemon logs a request it received; a hook that could not reach it
        # would have queued the request itself and started a drain instead.
        until(lambda: config.log_path.exists()
              and '"event": "sync requested"' in config.log_path.read_text(),
              what="the daemon to receive the hook request")
    finally:
        daemon.terminate()
        daemon.wait(30)
        err.close()


def test_hook_survives_an_unusable_daemon_file(
    tmp_path: Path, s3_config: MakeConfig, minio_client: Minio, s3_bucket: str
) -> None:
    """A daemon file with a URL urllib refuses (a damaged file, held by a live pid) must
    not cost the session end: the hook queues it and drains."""
    config = s3_config(daemon_port=pick_free_port())
    toml = write_toml(config, tmp_path / "c.toml")
    config.state_path.mkdir(parents=True, exist_ok=True)
    (config.state_path / "daemon.json").write_text(
        json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:80x3"}))
    payload = {"session_id": "s-stale", "hook_event_name": "SessionEnd", "reason": "other"}
    done = subprocess.run([EXE, "--config", str(toml), "hook", "session-end"],
                          input=json.dumps(payload), capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0 and not done.stderr, done.stderr
    until(lambda: manifests(minio_client, s3_bucket), what="the drained upload")


def test_uninstall_claude_removes_the_http_mode_too(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    home = tmp_path / "home"
    settings = home / ".claude" / "settings.json"
    settings.parent.mkdir(parents=True)
    text = '{"hooks": {"PreCompact": [{"hooks": [{"type": "command", "command": "true"}]}]}}'
    settings.write_text(text)
    toml = str(write_toml(make_config(daemon_token="t0ken-for-the-daemon"), tmp_path / "c.toml"))
    _run(home, "--config", toml, "install", "claude", "--mode", "http", "--write")
    written = settings.read_text()
    assert "/hooks/session-end" in written and "t0ken-for-the-daemon" not in written
    _run(home, "--config", toml, "uninstall", "claude", "--write")
    assert settings.read_text() == text
    assert not (home / ".claude.json").exists()


def test_install_http_warns_when_the_token_is_not_in_the_environment(
    tmp_path: Path, make_config: MakeConfig
) -> None:
    """Claude Code sends $AKOSHA_SYNC_DAEMON_TOKEN: a token only in the file means 401s."""
    home = tmp_path / "home"
    home.mkdir()
    token = "t0ken-for-the-daemon"
    toml = str(write_toml(make_config(daemon_token=token), tmp_path / "c.toml"))
    bare = {k: v for k, v in os.environ.items() if "DAEMON_TOKEN" not in k}
    shown = subprocess.run([EXE, "--config", toml, "install", "claude", "--mode", "http"],
                           env={**bare, "HOME": str(home)}, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    assert "Warning: the entries send the daemon token from the environment variable " \
           "AKOSHA_SYNC_DAEMON_TOKEN, which is not set here" in shown
    assert token not in shown
    exported = _run(home, "--config", toml, "install", "claude", "--mode", "http",
                    env={"AKOSHA_SYNC_DAEMON_TOKEN": token}).stdout
    assert "Warning" not in exported and token not in exported
