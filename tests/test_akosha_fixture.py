"""The Akosha fixtures start the real Akosha 0.11.0 and verify through its own MCP surface.

The fixtures come from ``support.akosha_fixtures``, loaded by ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import httpx
import pytest
from mcp import Client, MCPError
from mcp.types import TextContent

from support.akosha import (
    DUPLICATE_KEY_MARKER,
    MAX_REQUEST_BODY_BYTES,
    AkoshaServer,
    minimal_memory,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _ids(count: int) -> list[str]:
    """Memory ids are global in Akosha: every test uses its own."""
    prefix = uuid.uuid4().hex[:12]
    return [f"t-{prefix}-{i}" for i in range(count)]


def _memories(ids: list[str]) -> list[dict[str, object]]:
    return [
        minimal_memory(
            memory_id,
            text=f"memory {memory_id}",
            embedding=[(i + 1) / 1000 for i in range(384)],
            metadata={"source": "test-system", "created_at": "2026-01-02T03:04:05+00:00"},
        )
        for memory_id in ids
    ]


def test_health_ok(akosha: AkoshaServer) -> None:
    assert akosha.url == f"http://127.0.0.1:{akosha.port}/mcp"
    health = akosha.health()
    assert health["status"] == "ok"
    assert health["service"] == "akosha"
    with urllib.request.urlopen(akosha.health_url, timeout=5) as response:
        assert response.status == 200
    assert akosha.startup_seconds is not None
    assert "akosha_" in akosha.metrics_text()


def test_runs_isolated_in_workdir(akosha: AkoshaServer) -> None:
    assert akosha.pid is not None
    raw = Path(f"/proc/{akosha.pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    for key in ("HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "TMPDIR", "AKOSHA_DATA_PATH"):
        assert Path(env[key]).is_relative_to(akosha.workdir), key
    assert env["MCP_HOST"] == "127.0.0.1"
    assert env["MCP_PORT"] == str(akosha.port)
    assert Path(f"/proc/{akosha.pid}/cwd").resolve() == akosha.workdir.resolve()


async def test_lists_ingestion_tools(akosha: AkoshaServer) -> None:
    tools = await akosha.list_tools()
    assert {"store_memory", "batch_store_memories"} <= tools.keys()
    assert tools["batch_store_memories"]["required"] == ["memories"]
    assert tools["store_memory"]["required"] == ["memory_id", "text"]
    assert not {"store_reflection", "create_entity", "create_relation"} & tools.keys()
    assert not [name for name in tools if "delete" in name or "remove" in name]


async def test_batch_store_three_via_real_mcp_client(akosha: AkoshaServer) -> None:
    ids = _ids(3)
    async with Client(akosha.url) as client:
        result = await client.call_tool("batch_store_memories", {"memories": _memories(ids)})
    assert result.is_error is False
    answer = result.structured_content
    assert isinstance(answer, dict)
    assert answer["status"] == "completed"
    assert (answer["total"], answer["stored"], answer["failed"]) == (3, 3, 0)
    assert answer["errors"] == []
    # The same dict also comes as one JSON text block.
    [block] = result.content
    assert isinstance(block, TextContent)
    assert json.loads(block.text) == answer


async def test_resend_is_refused_as_duplicate(akosha: AkoshaServer) -> None:
    ids = _ids(3)
    first = await akosha.batch_store_memories(_memories(ids))
    assert first["stored"] == 3
    again = await akosha.batch_store_memories(_memories(ids))
    assert again["status"] == "failed"
    assert (again["total"], again["stored"], again["failed"]) == (3, 0, 3)
    assert [e["memory_id"] for e in again["errors"]] == ids
    for error in again["errors"]:
        assert DUPLICATE_KEY_MARKER in error["error"]
        assert f"conversation_id: {error['memory_id']}" in error["error"]
    mixed = await akosha.batch_store_memories(_memories([ids[0], *_ids(1)]))
    assert (mixed["status"], mixed["stored"], mixed["failed"]) == ("partial", 1, 1)


async def test_held_ids_reports_stored_ids_and_stores_the_rest(akosha: AkoshaServer) -> None:
    ids = _ids(4)
    assert (await akosha.batch_store_memories(_memories(ids[:2])))["stored"] == 2
    assert await akosha.held_ids(ids) == set(ids[:2])
    # Documented side effect: the probe stored the ids that were not held.
    assert await akosha.held_ids(ids) == set(ids)
    assert await akosha.held_ids([]) == set()


async def test_held_ids_spans_several_batches(akosha: AkoshaServer) -> None:
    ids = _ids(2500)  # > 1000 items per call and > 3 MiB of probes
    await akosha.batch_store_memories(_memories(ids[:5]))
    assert await akosha.held_ids(ids) == set(ids[:5])


async def test_oversized_request_is_refused_with_413(akosha: AkoshaServer) -> None:
    too_big = [minimal_memory(_ids(1)[0], text="x" * (MAX_REQUEST_BODY_BYTES + 1))]
    async with Client(akosha.url) as client:
        # The SDK hides the status: a 413 arrives as a generic JSON-RPC error.
        with pytest.raises(MCPError) as refused:
            await client.call_tool("batch_store_memories", {"memories": too_big})
        assert refused.value.code == -32603
        # The session survives; the next call goes through.
        ok = await client.call_tool("batch_store_memories", {"memories": _memories(_ids(1))})
        assert ok.structured_content is not None
        assert ok.structured_content["stored"] == 1
    async with httpx.AsyncClient() as http:
        response = await http.post(
            akosha.url,
            content=b" " * (MAX_REQUEST_BODY_BYTES + 1),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 413
    assert response.text == "Request body too large"


async def test_restart_keeps_port_but_loses_memories(private_akosha: AkoshaServer) -> None:
    server = private_akosha
    ids = _ids(3)
    assert (await server.batch_store_memories(_memories(ids)))["stored"] == 3
    port, url, first_pid = server.port, server.url, server.pid
    server.restart()
    assert (server.port, server.url) == (port, url)
    assert server.pid != first_pid
    assert server.health()["status"] == "ok"
    # The hot store is an in-memory DuckDB: nothing survives a restart.
    assert await server.held_ids(ids) == set()


async def test_kill_then_start(private_akosha: AkoshaServer) -> None:
    server = private_akosha
    ids = _ids(2)
    assert (await server.batch_store_memories(_memories(ids)))["stored"] == 2
    port = server.port
    server.kill()
    assert not server.is_running()
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(server.health_url, timeout=2)
    server.start()
    assert server.port == port
    assert await server.held_ids(ids) == set()
    server.close()
    server.close()  # idempotent
    assert not server.is_running()


def test_context_manager_and_close(akosha_python: Path, tmp_path: Path) -> None:
    server = AkoshaServer(tmp_path / "cm", python=akosha_python)
    with server as running:
        assert running is server
        assert running.is_running()
        pid = running.pid
    assert not server.is_running()
    assert pid is not None
    assert not Path(f"/proc/{pid}").exists()
    server.close()
