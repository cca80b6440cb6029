"""One entry point for "sync now", shared by the CLI and the daemon.

It takes the machine-wide lock, runs the hybrid orchestrator, and always returns a
result dict: a failure is ``success: False`` with a readable ``error``.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import structlog

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.redact import scrubber_for
from akosha_sync.sync.deadline import Deadline
from akosha_sync.sync.hybrid import HybridAkoshaSync
from akosha_sync.sync.protocol import HybridSyncError, ProgressCallback, SyncError, SyncResult
from akosha_sync.sync.snapshot import sweep_snapshot_dirs
from akosha_sync.sync.state import sync_lock

__all__ = ["run_sync"]

log = structlog.get_logger("akosha_sync.runner")


async def run_sync(
    config: AkoshaSyncConfig,
    *,
    method: str | None = None,
    enable_fallback: bool | None = None,
    trigger: str = "manual",
    progress: ProgressCallback | None = None,
    upload_reflections: bool = True,
    upload_knowledge_graph: bool = True,
    resend: bool = False,
    deadline: Deadline | None = None,
) -> dict[str, Any]:
    """Sync under the state lock; never raises for a sync failure.

    ``resend`` first forgets what Akosha's HTTP endpoint was sent, so everything
    goes again (for an Akosha that lost its data). ``deadline``: the whole sync's
    budget, lock wait included (default: ``upload_timeout_seconds`` from now).
    """
    started = time.monotonic()
    deadline = deadline or Deadline.for_config(config)
    try:
        async with sync_lock(config.state_path, timeout=deadline.remaining()):
            # Under the lock no live sync owns a snapshot folder: any there is a leftover.
            swept = await anyio.to_thread.run_sync(
                sweep_snapshot_dirs, config.state_path / "snapshots"
            )
            if swept:
                log.warning("removed leftover snapshot folders", folders=swept)
            hybrid = HybridAkoshaSync(config)
            if resend:
                # Imported here: the HTTP method pulls in the MCP SDK.
                from akosha_sync.sync.http import HttpSyncMethod

                await anyio.to_thread.run_sync(HttpSyncMethod(config).forget_delivered)
            result = await hybrid.sync_memories(
                force_method=method or config.force_method,  # type: ignore[arg-type]
                upload_reflections=upload_reflections,
                upload_knowledge_graph=upload_knowledge_graph,
                enable_fallback=enable_fallback,
                progress=progress,
                deadline=deadline,
            )
    except (SyncError, ValueError) as exc:
        asked = method or config.force_method
        result = SyncResult(
            # Every method failed: name what was asked for (cloud, http, auto), not the
            # "hybrid" orchestrator; one method that failed on its own names itself.
            method=asked if isinstance(exc, HybridSyncError) else (
                getattr(exc, "method", "") or asked),
            success=False,
            duration_seconds=round(time.monotonic() - started, 3),
            error=str(exc),
        ).to_dict()
        if isinstance(exc, HybridSyncError):
            result["method_attempts"] = exc.errors
    except Exception as exc:  # OSError, DuckDB, SQLite, a bug: a failed result, not a crash
        # (Cancellation is a BaseException and passes.)
        log.exception("sync failed with an unexpected error", trigger=trigger)
        result = SyncResult(
            method=method or config.force_method,
            success=False,
            duration_seconds=round(time.monotonic() - started, 3),
            error=f"the sync failed with an unexpected {type(exc).__name__}: {exc}. The "
            f"traceback is in the log ({config.log_path}). Try again; if it recurs, "
            "report it with that log.",
        ).to_dict()
    result["triggered_by"] = trigger
    result = dict(scrubber_for(config).clean(result))  # the one exit: no secret in a result
    log.info(
        "sync finished",
        trigger=trigger,
        method=result.get("method"),
        success=result.get("success"),
        upload_id=result.get("upload_id"),
        error=result.get("error"),
        duration_seconds=result.get("duration_seconds"),
    )
    return result
