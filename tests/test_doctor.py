"""`akosha-sync doctor` against a working set-up (real SeaweedFS, real Akosha, a real
daemon, Claude Code's files as `install claude --write` leaves them) and against each
broken piece: each failure names its check and the fix."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.doctor import Check, run_checks
from support.akosha import AkoshaServer
from support.configfile import write_toml
from support.process import pick_free_port
from test_server import EXE, Daemon, daemon_factory

__all__ = ["daemon_factory"]  # the fixture, re-used from test_server

MakeConfig = Callable[..., AkoshaSyncConfig]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(tmp_path / "home")}


def _install_claude(config: AkoshaSyncConfig, tmp_path: Path, *args: str) -> None:
    toml = write_toml(config, tmp_path / "install.toml")
    subprocess.run([EXE, "--config", str(toml), "install", "claude", "--write", *args],
                   env=_env(tmp_path), cwd=tmp_path, capture_output=True, check=True)


def _doctor(config: AkoshaSyncConfig, tmp_path: Path, *args: str
            ) -> subprocess.CompletedProcess[str]:
    toml = write_toml(config, tmp_path / "doctor.toml")
    return subprocess.run([EXE, "--config", str(toml), "doctor", *args], env=_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          check=False)


def _checks(config: AkoshaSyncConfig, tmp_path: Path) -> dict[str, Check]:
    checks = anyio.run(lambda: run_checks(config, project=tmp_path))
    return {c.name: c for c in checks}


def _failed(checks: dict[str, Check]) -> dict[str, Check]:
    return {n: c for n, c in checks.items() if c.status == "fail"}


def test_a_working_setup_passes_and_leaves_nothing_in_the_bucket(
    s3_config: MakeConfig, akosha: AkoshaServer, tmp_path: Path, minio_client: Minio,
    s3_bucket: str, daemon_factory: Callable[[AkoshaSyncConfig], Daemon],
) -> None:
    config = s3_config(akosha_url=akosha.url)
    _install_claude(config, tmp_path)
    daemon_factory(config)
    done = _doctor(config, tmp_path, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == {
        "configuration": "ok", "credentials": "ok", "bucket": "ok", "akosha health": "ok",
        "akosha mcp": "ok", "daemon": "ok", "claude code registration": "ok",
        "sessionend hook": "ok",
    }
    assert "probe written, read and removed" in json.dumps(report)
    assert list(minio_client.list_objects(s3_bucket, recursive=True)) == []
    assert config.secret_access_key not in done.stdout

    text = _doctor(config, tmp_path)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 9 and lines[-1] == "all checks passed"
    assert all(line.startswith("ok ") for line in lines[:-1])


def test_wrong_key(s3_config: MakeConfig, tmp_path: Path, akosha: AkoshaServer,
                   minio_client: Minio, s3_bucket: str) -> None:
    config = s3_config(secret_access_key="not-the-right-secret-0123", akosha_url=akosha.url)
    failed = _failed(_checks(config, tmp_path))
    bucket = failed["bucket"]
    assert "credentials were refused" in bucket.detail
    assert "secret_access_key" in bucket.fix
    assert "not-the-right-secret-0123" not in bucket.detail + bucket.fix
    assert list(minio_client.list_objects(s3_bucket, recursive=True)) == []


def test_bucket_missing(s3_config: MakeConfig, tmp_path: Path) -> None:
    config = s3_config(cloud_bucket="no-such-bucket-for-doctor")
    bucket = _failed(_checks(config, tmp_path))["bucket"]
    assert "does not exist" in bucket.detail
    assert bucket.fix == "create the bucket, or correct cloud_bucket"


def test_no_credentials(s3_config: MakeConfig, tmp_path: Path) -> None:
    config = s3_config(access_key_id="", secret_access_key="")
    failed = _failed(_checks(config, tmp_path))
    assert "AWS_ACCESS_KEY_ID" in failed["credentials"].fix


def test_akosha_down(s3_config: MakeConfig, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{pick_free_port()}/mcp"
    checks = _checks(s3_config(akosha_url=down), tmp_path)
    assert checks["bucket"].status == "ok"
    health = checks["akosha health"]
    assert health.status == "fail" and "did not answer" in health.detail
    assert health.fix.startswith("start Akosha, or correct akosha_url")
    assert checks["akosha mcp"].status == "skip"


def test_akosha_answers_health_but_not_mcp(
    s3_config: MakeConfig, tmp_path: Path, akosha: AkoshaServer
) -> None:
    wrong_path = akosha.url.removesuffix("/mcp") + "/not-mcp"
    mcp = _checks(s3_config(akosha_url=wrong_path), tmp_path)["akosha mcp"]
    assert mcp.status == "fail" and "/mcp" in mcp.fix


def test_daemon_down_and_claude_code_not_set_up(
    s3_config: MakeConfig, tmp_path: Path, akosha: AkoshaServer
) -> None:
    config = s3_config(akosha_url=akosha.url, daemon_port=pick_free_port())
    failed = _failed(_checks(config, tmp_path))
    assert set(failed) == {"daemon", "claude code registration", "sessionend hook"}
    assert "akosha-sync install claude --write" in failed["sessionend hook"].fix
    _install_claude(config, tmp_path, "--mode", "http")  # the daemon is needed
    failed = _failed(_checks(config, tmp_path))
    assert set(failed) == {"daemon"}
    assert "nothing answers" in failed["daemon"].detail
    assert "akosha-sync serve --transport http" in failed["daemon"].fix
    done = _doctor(config, tmp_path)
    assert done.returncode == 1
    line = next(ln for ln in done.stdout.splitlines() if " daemon " in ln)
    assert line.startswith("fail") and "fix: start it: akosha-sync serve" in line


def test_stdio_setup_or_the_plugin_need_no_daemon(
    s3_config: MakeConfig, tmp_path: Path, akosha: AkoshaServer
) -> None:
    config = s3_config(akosha_url=akosha.url, daemon_port=pick_free_port())
    _install_claude(config, tmp_path, "--mode", "stdio", "--scope", "project")
    checks = _checks(config, tmp_path)
    assert _failed(checks) == {}
    assert checks["daemon"].status == "skip"
    assert str(tmp_path / ".mcp.json") in checks["claude code registration"].detail

    plugin_home = tmp_path / "plugin"
    plugin_home.mkdir()
    settings = tmp_path / "home" / ".claude" / "settings.json"
    data: dict[str, Any] = json.loads(settings.read_text()) if settings.exists() else {}
    data["enabledPlugins"] = {"akosha-sync@akosha-sync": True}
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(data))
    checks = _checks(config, plugin_home)  # another project: only the plugin applies
    assert _failed(checks) == {}
    assert "plugin" in checks["claude code registration"].detail
    assert "plugin" in checks["sessionend hook"].detail



def test_registration_pointing_elsewhere(s3_config: MakeConfig, tmp_path: Path) -> None:
    _install_claude(s3_config(daemon_port=pick_free_port()), tmp_path, "--mode", "http")
    config = s3_config(daemon_port=pick_free_port())  # the daemon moved since install
    registration = _failed(_checks(config, tmp_path))["claude code registration"]
    assert config.daemon_url in registration.detail
    assert "install claude --write" in registration.fix


def test_a_bucket_not_in_use_is_skipped(s3_config: MakeConfig, tmp_path: Path) -> None:
    checks = _checks(s3_config(force_method="http", secret_access_key="wrong-0123456789"),
                     tmp_path)
    assert checks["bucket"].status == "skip" and checks["credentials"].status == "skip"
