"""``sync_interval_minutes``: the daemon also syncs on a period while the databases
change (long sessions), and only then. The clock is the one seam: a configured
minute lasts 50 ms here. Uploads go to the real SeaweedFS."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import SampleInfo, add_conversations
from akosha_sync.server.daemon import SyncDaemon
from support.verify import manifests

MakeConfig = Callable[..., AkoshaSyncConfig]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _until(check: Callable[[], Any], *, timeout: float = 60, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        await anyio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.anyio
async def test_interval_syncs_while_the_databases_change(
    s3_config: MakeConfig, sample: SampleInfo, minio_client: Minio, s3_bucket: str
) -> None:
    daemon = SyncDaemon(s3_config(sync_interval_minutes=2))
    daemon.seconds_per_minute = 0.025  # the clock seam: a period of 50 ms
    async with daemon.running():
        await _until(lambda: daemon.periodic_checks >= 3, what="three quiet periods")
        assert manifests(minio_client, s3_bucket) == []  # unchanged: nothing sent

        add_conversations(sample.data_dir, 3, seed=7)  # the session goes on
        history = await _until(lambda: daemon.queue.history(5), what="the periodic sync")
        assert len(manifests(minio_client, s3_bucket)) == 1
        assert [h["triggered_by"] for h in history] == ["interval"] and history[0]["success"]

        checks = daemon.periodic_checks
        await _until(lambda: daemon.periodic_checks >= checks + 3, what="more quiet periods")
        assert len(manifests(minio_client, s3_bucket)) == 1  # unchanged since: no more

        add_conversations(sample.data_dir, 2, seed=8)
        await _until(lambda: len(daemon.queue.history(5)) == 2, what="the second sync")
        assert len(manifests(minio_client, s3_bucket)) == 2


@pytest.mark.anyio
async def test_no_interval_by_default(s3_config: MakeConfig, sample: SampleInfo) -> None:
    config = s3_config()
    assert config.sync_interval_minutes == 0
    daemon = SyncDaemon(config)
    daemon.seconds_per_minute = 0.001
    async with daemon.running():
        add_conversations(sample.data_dir, 1, seed=9)
        # The worker answers a real request; by then a timer would have ticked many times.
        result = await daemon.wait_for(await daemon.submit("manual"))
        assert result["success"]
    assert daemon.periodic_checks == 0
    assert [h["triggered_by"] for h in daemon.queue.history(5)] == ["manual"]


def test_sync_interval_minutes_is_checked(make_config: MakeConfig) -> None:
    assert not make_config(sync_interval_minutes=30).validate()
    for bad in (-1, 1441):
        problems = make_config(sync_interval_minutes=bad).validate()
        assert any("sync_interval_minutes" in p for p in problems), problems
