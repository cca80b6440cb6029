"""The hybrid orchestrator: cloud first, Akosha's HTTP endpoint as the fallback.

``force_method`` (per call, else the configuration's) picks a single method and
never falls back. In ``auto`` the cloud runs when configured; if it fails and
fallback is enabled, HTTP runs and the result lists what was tried and why each
failed. When every method fails, ``HybridSyncError.errors`` holds them all.

All methods share one ``Deadline`` (see ``deadline``): a method followed by a
fallback leaves the fallback's reserve; the last one gets all that remains.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import anyio
import structlog

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sync.cloud import CloudSyncMethod
from akosha_sync.sync.deadline import Deadline, fallback_reserve
from akosha_sync.sync.protocol import HybridSyncError, SyncError, SyncMethod

__all__ = ["HybridAkoshaSync"]

log = structlog.get_logger("akosha_sync.hybrid")


class HybridAkoshaSync:
    """Orchestrates the sync methods in priority order: cloud, then HTTP."""

    def __init__(self, config: AkoshaSyncConfig) -> None:
        # Methods are built lazily, so check here what each would refuse at once (a
        # plain-http akosha_url must be refused, not tried).
        problems = config.validate()
        if problems:
            raise ValueError("invalid akosha-sync configuration: " + "; ".join(problems))
        self.config = config
        self._methods: dict[str, SyncMethod] = {}

    def _get_method(self, method_name: str) -> SyncMethod | None:
        """The method of that name, built on first use (and then the same instance)."""
        method = self._methods.get(method_name)
        if method is None:
            if method_name == "cloud":
                method = CloudSyncMethod(self.config)
            elif method_name == "http":
                # The MCP SDK (~1 s, ~60 MB) loads only when the HTTP method is needed.
                from akosha_sync.sync.http import HttpSyncMethod

                method = HttpSyncMethod(self.config)
            else:
                return None
            self._methods[method_name] = method
        return method

    def _plan(self, force_method: str, enable_fallback: bool) -> list[str]:
        if force_method in ("cloud", "http"):
            return [force_method]
        if force_method != "auto":
            raise ValueError(
                f"force_method {force_method!r} is not allowed; use 'auto', 'cloud' or 'http'."
            )
        if self.config.cloud_configured:
            return ["cloud", "http"] if enable_fallback else ["cloud"]
        return ["http"]

    async def sync_memories(
        self,
        force_method: Literal["auto", "cloud", "http"] = "auto",
        upload_reflections: bool = True,
        upload_knowledge_graph: bool = True,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Sync with the planned methods; raise ``HybridSyncError`` if all fail.

        Keywords: ``enable_fallback`` (default: the configuration's), ``progress`` and
        ``deadline`` (default: ``upload_timeout_seconds`` from now).
        """
        deadline: Deadline = kwargs.pop("deadline", None) or Deadline.for_config(self.config)
        enable_fallback = kwargs.pop("enable_fallback", None)
        if enable_fallback is None:
            enable_fallback = self.config.enable_fallback
        plan = self._plan(force_method, bool(enable_fallback))
        attempts: list[dict[str, Any]] = []
        for index, name in enumerate(plan):
            method = self._get_method(name)
            assert method is not None
            if deadline.expired:
                attempts.append({
                    "method": name,
                    "error": f"not tried: the sync's budget of {deadline.seconds:g}s "
                    "(upload_timeout_seconds) was used up",
                })
                continue
            # is_available may ask Akosha's /health (up to ~1 s): keep the loop free.
            if not await anyio.to_thread.run_sync(method.is_available):
                reason = (
                    "cloud_bucket is not configured"
                    if name == "cloud"
                    else f"Akosha is not answering at {self.config.redacted()['akosha_url']}"
                )
                attempts.append({"method": name, "error": f"not available: {reason}"})
                log.warning("sync method not available", method=name, reason=reason)
                continue
            started = time.monotonic()
            last = index == len(plan) - 1
            share = deadline if last else deadline.leaving(fallback_reserve(deadline.seconds))
            try:
                result = await method.sync(
                    upload_reflections=upload_reflections,
                    upload_knowledge_graph=upload_knowledge_graph,
                    deadline=share,
                    **kwargs,
                )
            except SyncError as exc:
                attempts.append({
                    "method": name,
                    "error": str(exc),
                    "duration_seconds": round(time.monotonic() - started, 3),
                })
                log.warning("sync method failed", method=name, error=str(exc))
                continue
            if attempts:
                result["fallback_from"] = [a["method"] for a in attempts]
            result["method_attempts"] = [*attempts, {"method": name, "error": result["error"]}]
            return result
        summary = "; ".join(f"{a['method']}: {a['error']}" for a in attempts)
        raise HybridSyncError(f"every sync method failed ({summary})", errors=attempts)
