"""The real Claude Code CLI for tests, in a sandboxed HOME with no login.

``claude_executable()`` builds (once, cached) the npm package with
scripts/build-claude-code.sh; ``CLAUDE_CODE_DIR`` overrides the cache folder.
Without a login ``claude -p hi`` cannot answer, but it still starts the MCP
servers and runs the SessionEnd hooks, which is all these tests need.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from akosha_sync.config import AkoshaSyncConfig

from .configfile import write_toml
from .wait import until

__all__ = ["ROOT", "ClaudeSandbox", "claude_executable", "until", "write_toml"]

ROOT = Path(__file__).resolve().parents[2]
_BUILD = ROOT / "scripts" / "build-claude-code.sh"
# Variables that would log the sandboxed Claude Code in or tell it it runs nested.
_DROPPED = ("ANTHROPIC_", "CLAUDE", "AWS_", "AKOSHA_SYNC_", "SESSION_BUDDY_")


def claude_executable() -> Path:
    """The cached ``claude``; the test fails (never skips) when it cannot be built."""
    done = subprocess.run(["bash", str(_BUILD)], capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:
        pytest.fail(f"Claude Code could not be installed ({_BUILD}):\n{done.stderr[-2000:]}")
    exe = Path(done.stdout.strip().splitlines()[-1])
    if not exe.is_file():
        pytest.fail(f"{_BUILD} named {exe}, which does not exist")
    return exe


class ClaudeSandbox:
    """A fresh HOME with our configuration at its default place, and ways to run
    ``claude`` and ``akosha-sync`` there as a user would."""

    def __init__(self, exe: Path, home: Path, config: AkoshaSyncConfig) -> None:
        self.exe = exe
        self.home = home
        self.config = config
        self.project = home / "project"
        self.project.mkdir(parents=True, exist_ok=True)
        write_toml(config, home / ".config" / "akosha-sync" / "config.toml")
        env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
        env.update(
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local" / "share"),
            # The project's venv first: the plugin runs the bare `akosha-sync`.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
            DISABLE_AUTOUPDATER="1",
            DISABLE_TELEMETRY="1",
        )
        self.env = env

    def claude(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.exe), *args], cwd=self.project, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def akosha_sync(self, *args: str) -> subprocess.CompletedProcess[str]:
        exe = Path(sys.executable).with_name("akosha-sync")
        return subprocess.run([str(exe), *args], cwd=self.project, env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60, check=False)
