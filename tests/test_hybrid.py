"""The orchestrator's fallback from the cloud to Akosha's HTTP endpoint, for real:
SeaweedFS stopped (or a cloud endpoint nobody listens on) and the real Akosha 0.11.

What Akosha holds is confirmed through Akosha (``held_ids``), once per test, at the end.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import SampleInfo
from akosha_sync.sync.hybrid import HybridAkoshaSync
from akosha_sync.sync.protocol import HybridSyncError
from akosha_sync.sync.records import memory_id
from support.akosha import AkoshaServer, pick_free_port

MakeConfig = Callable[..., AkoshaSyncConfig]


def _dead_url(path: str = "") -> str:
    """A loopback URL on a port nobody listens on: connections are refused."""
    return f"http://127.0.0.1:{pick_free_port()}{path}"


def _config(
    make_config: MakeConfig,
    credentials: Any,
    *,
    cloud_endpoint: str,
    akosha_url: str,
    bucket: str = "akosha-test",
    **overrides: Any,
) -> AkoshaSyncConfig:
    return make_config(
        system_id=f"t-{uuid.uuid4().hex[:10]}",
        cloud_bucket=bucket,
        cloud_endpoint=cloud_endpoint,
        access_key_id=credentials.access_key,
        secret_access_key=credentials.secret_key,
        akosha_url=akosha_url,
        **overrides,
    )


def _timed(hybrid: HybridAkoshaSync, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Record when each method's sync starts and ends (perf_counter)."""
    marks: dict[str, float] = {}
    for name in ("cloud", "http"):
        method = hybrid._get_method(name)
        assert method is not None
        original = method.sync

        async def timed(*args: Any, _name: str = name, _sync: Any = original, **kw: Any) -> Any:
            marks[f"{_name}_start"] = time.perf_counter()
            try:
                return await _sync(*args, **kw)
            finally:
                marks[f"{_name}_end"] = time.perf_counter()

        monkeypatch.setattr(method, "sync", timed)
    return marks


def _probe_ids(config: AkoshaSyncConfig, sample: SampleInfo) -> list[str]:
    sid = config.system_id
    return [memory_id(sid, "conversation", i) for i in sample.wal_conversation_ids]


def test_auto_falls_back_to_http_when_seaweedfs_is_stopped(
    private_seaweedfs: Any,
    s3_credentials: Any,
    akosha: AkoshaServer,
    make_config: MakeConfig,
    sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(
        make_config,
        s3_credentials,
        cloud_endpoint=private_seaweedfs.endpoint,
        bucket="private",
        akosha_url=akosha.url,
    )
    private_seaweedfs.stop()
    hybrid = HybridAkoshaSync(config)
    marks = _timed(hybrid, monkeypatch)
    started = time.perf_counter()
    result = anyio.run(hybrid.sync_memories)
    total = time.perf_counter() - started

    assert result["method"] == "http" and result["success"], result["error"]
    assert result["fallback_from"] == ["cloud"]
    cloud_attempt = result["method_attempts"][0]
    assert cloud_attempt["method"] == "cloud" and "could not connect" in cloud_attempt["error"]
    assert result["details"]["stored"]["conversation"] == sample.row_counts["conversations_v2"]
    refused_to_fallback = marks["http_start"] - marks["cloud_end"]
    cloud_start_to_fallback = marks["http_start"] - marks["cloud_start"]
    print(  # the real figures, for the record (pytest -s)
        f"\ncloud attempt {marks['cloud_end'] - marks['cloud_start']:.3f}s, "
        f"cloud refused -> http start {refused_to_fallback:.3f}s, "
        f"cloud start -> http start {cloud_start_to_fallback:.3f}s, total {total:.3f}s"
    )
    # Loose bounds for a shared 2-core machine; measured ~0.3 s and ~2 s.
    assert cloud_start_to_fallback < 5
    assert total < 15
    probe = _probe_ids(config, sample)
    assert anyio.run(akosha.held_ids, probe) == set(probe)


def test_forced_cloud_with_cloud_down_never_touches_http(
    s3_credentials: Any,
    akosha: AkoshaServer,
    make_config: MakeConfig,
    sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(
        make_config, s3_credentials, cloud_endpoint=_dead_url(), akosha_url=akosha.url
    )
    hybrid = HybridAkoshaSync(config)
    marks = _timed(hybrid, monkeypatch)
    with pytest.raises(HybridSyncError) as failed:
        anyio.run(lambda: hybrid.sync_memories(force_method="cloud"))
    assert [e["method"] for e in failed.value.errors] == ["cloud"]
    assert "http_start" not in marks
    assert anyio.run(akosha.held_ids, _probe_ids(config, sample)) == set()


@pytest.mark.parametrize("where", ["call", "config"])
def test_fallback_disabled_is_obeyed(
    where: str,
    s3_credentials: Any,
    akosha: AkoshaServer,
    make_config: MakeConfig,
    sample: SampleInfo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = _config(
        make_config,
        s3_credentials,
        cloud_endpoint=_dead_url(),
        akosha_url=akosha.url,
        enable_fallback=where == "call",  # the call's False must win over the config's True
    )
    hybrid = HybridAkoshaSync(config)
    marks = _timed(hybrid, monkeypatch)
    kwargs: dict[str, Any] = {"enable_fallback": False} if where == "call" else {}
    with pytest.raises(HybridSyncError) as failed:
        anyio.run(lambda: hybrid.sync_memories(force_method="auto", **kwargs))
    assert [e["method"] for e in failed.value.errors] == ["cloud"]
    assert "http_start" not in marks
    assert anyio.run(akosha.held_ids, _probe_ids(config, sample)) == set()


def test_both_down_names_both_methods(
    s3_credentials: Any, make_config: MakeConfig
) -> None:
    akosha_url = _dead_url("/mcp")
    config = _config(
        make_config, s3_credentials, cloud_endpoint=_dead_url(), akosha_url=akosha_url
    )
    started = time.perf_counter()
    with pytest.raises(HybridSyncError) as failed:
        anyio.run(HybridAkoshaSync(config).sync_memories)
    assert time.perf_counter() - started < 10
    errors = {e["method"]: e["error"] for e in failed.value.errors}
    assert list(errors) == ["cloud", "http"]
    assert "could not connect" in errors["cloud"]
    assert akosha_url in errors["http"] and "not available" in errors["http"]
    assert "cloud" in str(failed.value) and "http" in str(failed.value)
