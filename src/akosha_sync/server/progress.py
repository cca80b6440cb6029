"""Forward a long operation's progress to an MCP client as progress notifications."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from mcp.server.mcpserver import Context

__all__ = ["Progress", "with_progress"]

T = TypeVar("T")
Progress = Callable[[str, int, int], None]


async def with_progress(ctx: Context, work: Callable[[Progress], Awaitable[T]]) -> T:
    """Run ``work(progress)``, forwarding each ``progress(phase, done, total)`` call as an
    MCP progress notification. Updates are dropped when the client reads slowly:
    progress is advisory and must never hold the work up."""
    send, receive = anyio.create_memory_object_stream[tuple[str, int, int]](64)

    def on_progress(phase: str, done: int, total: int) -> None:
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            send.send_nowait((phase, done, total))

    async def forward() -> None:
        async with receive:
            async for phase, done, total in receive:
                await ctx.report_progress(done, total or None, phase)

    failure: Exception | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(forward)
        try:
            result = await work(on_progress)
        except Exception as exc:  # raised after the group, not wrapped in an ExceptionGroup
            failure = exc
        finally:
            send.close()
    if failure is not None:
        raise failure
    return result
