"""Entry points over a configuration, shared by the CLI, the daemon and the MCP tools.

Each opens the configured store, retries transient failures like a sync does, and
turns store failures into ``CloudUploadError`` with a sentence naming the bucket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog

from akosha_sync.config import AkoshaSyncConfig, system_id_problem
from akosha_sync.repository.checks import LastRun, save_last_run
from akosha_sync.repository.forget import ForgetReport, forget
from akosha_sync.repository.manifest import upload_id_problem
from akosha_sync.repository.prune import WAIT_SECONDS, PruneReport, prune
from akosha_sync.repository.retention import Policy, apply_policy
from akosha_sync.repository.snapshots import UploadInfo, list_snapshots, list_system_ids
from akosha_sync.repository.store import make_store, with_retries
from akosha_sync.repository.verify import VerifyReport, parse_subset, verify

__all__ = [
    "ProgressCallback",
    "apply_configured_retention",
    "configured_policy",
    "forget_uploads",
    "prune_unused",
    "snapshots",
    "verify_uploads",
]

T = TypeVar("T")
ProgressCallback = Callable[[str, int, int], None]
log = structlog.get_logger("akosha_sync.repository")


def _check_request(config: AkoshaSyncConfig, system_id: str | None = None) -> None:
    """Refuse, before any request, a malformed ``system_id`` or a config with no bucket."""
    if system_id and (problem := system_id_problem(system_id)):
        raise ValueError(problem)
    if not config.cloud_configured:
        raise ValueError(
            "no bucket is configured (cloud_bucket is empty): snapshots, verify, forget and "
            "prune work on the cloud store only."
        )


async def _run(config: AkoshaSyncConfig, what: str, op: Callable[[], Awaitable[T]]) -> T:
    return await with_retries(op, config=config, what=what, connect_attempts=2)


async def snapshots(
    config: AkoshaSyncConfig,
    *,
    system_id: str | None = None,
    all_systems: bool = False,
    limit: int | None = None,
) -> list[UploadInfo]:
    """Every upload of this system (or ``system_id``, or all systems), oldest first."""
    _check_request(config, system_id)
    store = make_store(config)

    async def op() -> list[UploadInfo]:
        sids = (
            await list_system_ids(store)
            if all_systems
            else [system_id or config.system_id_resolved]
        )
        return await list_snapshots(store, sids, limit=limit)

    return await _run(config, "listing the uploads", op)


def configured_policy(config: AkoshaSyncConfig) -> Policy:
    return Policy(**config.retention_policy_fields())


async def forget_uploads(
    config: AkoshaSyncConfig,
    policy: Policy,
    *,
    system_id: str | None = None,
    dry_run: bool,
    progress: ProgressCallback | None = None,
    upload_ids: list[str] | None = None,
) -> ForgetReport:
    """Apply ``policy`` to one system's uploads (this machine's by default), or forget
    exactly ``upload_ids``."""
    _check_request(config, system_id)
    if upload_ids:
        if not policy.empty:
            raise ValueError("give upload ids or a --keep-* policy, not both")
        for uid in upload_ids:
            if problem := upload_id_problem(uid):
                raise ValueError(problem)
    else:
        apply_policy([], policy)  # an empty or invalid policy raises here, before any I/O
    store = make_store(config)
    sid = system_id or config.system_id_resolved
    return await _run(
        config,
        "forgetting uploads",
        lambda: forget(store, sid, policy, dry_run=dry_run, progress=progress,
                       upload_ids=upload_ids),
    )


async def apply_configured_retention(
    config: AkoshaSyncConfig, result: dict[str, Any]
) -> ForgetReport | None:
    """After a successful cloud sync: apply the ``retention_*`` policy, if one is set.

    Never raises: a failed forget is logged and retried after the next sync; the sync
    itself already succeeded.
    """
    policy = configured_policy(config)
    if policy.empty or not result.get("success") or result.get("method") != "cloud":
        return None
    try:
        report = await forget_uploads(config, policy, dry_run=False)
    except Exception as exc:
        log.warning("retention failed; it is tried again after the next sync", error=str(exc))
        return None
    if report.forgotten or report.errors:
        log.info(
            "retention applied",
            policy=report.policy,
            forgotten=report.forgotten,
            kept=len(report.kept),
            errors=report.errors,
        )
    return report



async def verify_uploads(
    config: AkoshaSyncConfig,
    *,
    upload_id: str | None = None,
    all_uploads: bool = False,
    system_id: str | None = None,
    read_data: str | None = None,
    open_databases: bool = False,
    progress: ProgressCallback | None = None,
) -> VerifyReport:
    """Verify uploads in the bucket; the run is also remembered in ``state_dir``."""
    _check_request(config, system_id)
    if upload_id and all_uploads:
        raise ValueError("give one upload id or ask for all uploads, not both")
    if read_data is not None:
        parse_subset(read_data)  # a bad subset is the user's to fix, not a store failure
    store = make_store(config)
    sid = system_id or config.system_id_resolved
    report = await _run(
        config,
        "verifying uploads",
        lambda: verify(
            store, config, sid, upload_id=upload_id, all_uploads=all_uploads,
            read_data=read_data, open_databases=open_databases, progress=progress,
        ),
    )
    save_last_run(config.state_path, LastRun(
        at=report.at, level=report.level, ok=report.ok,
        uploads=[u.upload_id for u in report.uploads], problems=report.problem_count,
    ))
    return report


async def prune_unused(
    config: AkoshaSyncConfig,
    *,
    system_id: str | None = None,
    dry_run: bool,
    wait_seconds: float = WAIT_SECONDS,
    progress: ProgressCallback | None = None,
) -> PruneReport:
    """Delete what no committed upload needs (see ``repository.prune``)."""
    _check_request(config, system_id)
    store = make_store(config)
    sid = system_id or config.system_id_resolved
    return await _run(
        config,
        "pruning",
        lambda: prune(store, sid, dry_run=dry_run, wait_seconds=wait_seconds,
                      progress=progress),
    )
