"""Shared test set-up: real servers come from the plugins in tests/support."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import SampleInfo, create_sample_databases

pytest_plugins = ["support.s3_fixtures", "support.akosha_fixtures"]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test sees the developer's AWS/akosha settings or writes into their home."""
    import os

    for name in list(os.environ):
        if name.startswith(
            ("AWS_", "AKOSHA_SYNC_", "SESSION_BUDDY_AKOSHA_", "SESSION_BUDDY_CLOUD_SYNC__")
        ):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "home" / ".local" / "share"))


@pytest.fixture
def sample(tmp_path: Path) -> SampleInfo:
    """Session-Buddy-shaped databases, some rows only in the WAL."""
    return create_sample_databases(tmp_path / "claude-data")


@pytest.fixture
def s3_config(
    make_config: Callable[..., AkoshaSyncConfig], seaweedfs: Any, s3_bucket: str,
    s3_credentials: Any,
) -> Callable[..., AkoshaSyncConfig]:
    """``make_config`` aimed at a fresh bucket of the shared SeaweedFS."""

    def make(**overrides: Any) -> AkoshaSyncConfig:
        values = {
            "cloud_bucket": s3_bucket,
            "cloud_endpoint": seaweedfs.endpoint,
            "access_key_id": s3_credentials.access_key,
            "secret_access_key": s3_credentials.secret_key,
            "akosha_url": "http://127.0.0.1:9/mcp",  # nothing listens: no HTTP fallback
        }
        values.update(overrides)
        return make_config(**values)

    return make


@pytest.fixture
def make_config(tmp_path: Path, sample: SampleInfo) -> Callable[..., AkoshaSyncConfig]:
    """A config pointing at the sample databases and a private state folder."""

    def make(**overrides: Any) -> AkoshaSyncConfig:
        values: dict[str, Any] = {
            "system_id": "test-host",
            "data_dir": str(sample.data_dir),
            "state_dir": str(tmp_path / "state"),
            "log_file": str(tmp_path / "state" / "akosha-sync.log"),
            "max_retries": 1,
            "retry_backoff_seconds": 0.1,
            "upload_timeout_seconds": 120,
        }
        values.update(overrides)
        return AkoshaSyncConfig(**values)

    return make
