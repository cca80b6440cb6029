"""MCP tools over the bucket as a repository: list, verify, restore, forget, prune.

Each returns a structured result; long ones report progress like ``sync_to_akosha``.
``akosha_restore``, ``akosha_forget`` and ``akosha_prune`` are destructive and plan
first: restore returns a plan and a one-time ``confirm_token`` (valid for
:data:`TOKEN_TTL` seconds, in this server process only) and restores only when called
again with it; forget and prune delete only with ``dry_run=False``.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.server.progress import Progress, with_progress

__all__ = ["CHECKS", "DESTRUCTIVE", "PRUNE_WAIT_MAX", "READ_ONLY", "TOKEN_TTL",
           "add_repository_tools"]

T = TypeVar("T")
TOKEN_TTL = 600.0

# Shared with app.py's own tools. Every tool here reaches the bucket: open world.
READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, open_world_hint=True)
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=True)
# verify changes nothing in the bucket, but it writes its local check record (which
# forget's "keep the newest verified" rule reads): not read-only, never destructive.
CHECKS = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                         open_world_hint=True)
PRUNE_WAIT_MAX = 900.0  # the CLI's own wait; a tool call may choose less

Level = Literal["structure", "read-data", "open"]


def _about(description: str) -> Any:
    """A tool argument's description, shown in its schema (clients show it to the model)."""
    return Field(description=description)


# The library's messages name the command line's flags and commands; a tool's caller
# knows the tools and their arguments. Longest forms first.
_IN_TOOL_TERMS = [
    (re.compile(r"`akosha-sync snapshots --system ([\w-]+)`"),
     r"akosha_list_snapshots(system_id=\1)"),
    (re.compile(r"`akosha-sync snapshots --all-systems`"),
     "akosha_list_snapshots(all_systems=true)"),
    (re.compile(r"`akosha-sync snapshots`"), "akosha_list_snapshots"),
    (re.compile(r"`akosha-sync verify --all`"), "akosha_verify(all_uploads=true)"),
    (re.compile(r"`akosha-sync forget UPLOAD_ID[ .]*`"), "akosha_forget(upload_ids=[...])"),
    (re.compile(r"`akosha-sync prune`"), "akosha_prune"),
    (re.compile(r"verify --open"), 'akosha_verify(level="open")'),
    (re.compile(r"--system ID"), "system_id"),
    (re.compile(r"--system ([\w-]+)"), r"system_id=\1"),
    (re.compile(r"[Rr]estore --to "), "restore into "),
    (re.compile(r"--keep-(\w+)"), r"keep_\1"),
    (re.compile(r"--(at|to)\b"), r"`\1`"),
    (re.compile(r"--force does not override this"), "nothing overrides this"),
]


def in_tool_terms(message: str) -> str:
    """``message`` with the CLI's flags and commands named as the MCP tools' ones."""
    for pattern, replacement in _IN_TOOL_TERMS:
        message = pattern.sub(replacement, message)
    return message


def _fail(exc: Exception) -> ToolError:
    return ToolError(in_tool_terms(str(exc)))


async def _reported(ctx: Context, work: Callable[[Progress], Awaitable[Any]]) -> Any:
    """Run a tool's ``work`` with progress; its result as builtins, a failure as the
    tool's error (in the tools' terms)."""
    try:
        result = await with_progress(ctx, work)
    except Exception as exc:
        raise _fail(exc) from exc
    return msgspec.to_builtins(result)


def add_repository_tools(server: MCPServer, config: AkoshaSyncConfig) -> None:
    """Register the repository tools on ``server``."""
    pending: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {}

    @server.tool(annotations=READ_ONLY)
    async def akosha_list_snapshots(
        system_id: Annotated[str | None, _about(
            "another machine's uploads (default: this machine's)")] = None,
        limit: Annotated[int | None, _about(
            "at most this many of the newest uploads; null for all")] = 20,
        all_systems: Annotated[bool, _about(
            "every machine's uploads (on a new machine: find the old one's id)")] = False,
    ) -> dict[str, Any]:
        """The uploads in the bucket, newest last: id, system, time, files, logical size,
        bytes new, conversations, complete or not (a sync that never committed is listed
        as incomplete), and the last verification. Reads the bucket, not local state.

        system_id: another machine's uploads (default: this one's).
        all_systems: every machine's uploads (on a new machine: find the old one's id).
        limit: at most this many of the newest (default 20; null for all).
        """
        from akosha_sync.repository.service import snapshots

        if all_systems and system_id:
            raise ToolError("give system_id or all_systems, not both")
        if limit is not None and limit < 0:
            raise ToolError(f"limit is {limit}; give a count of 0 or more, or null for all")
        try:
            infos = await snapshots(config, system_id=system_id, all_systems=all_systems,
                                    limit=limit)
        except Exception as exc:
            raise _fail(exc) from exc
        shown = "all" if all_systems else system_id or config.system_id_resolved
        return {"system_id": shown, "count": len(infos),
                "snapshots": msgspec.to_builtins(infos)}

    @server.tool(annotations=CHECKS)
    async def akosha_verify(
        ctx: Context,
        upload_id: Annotated[str | None, _about("one upload (default: the newest)")] = None,
        level: Annotated[Level, _about(
            '"structure": every object exists at its size; "read-data": also hash every '
            'piece; "open": also restore and count rows with DuckDB')] = "structure",
        all_uploads: Annotated[bool, _about("every upload of this machine")] = False,
    ) -> dict[str, Any]:
        """Check uploads in the bucket. level "structure": every object each needs exists
        with the right size; "read-data": also download and check the SHA-256 of every
        piece; "open": also restore into a temporary folder and compare DuckDB row counts
        with the manifest. upload_id: one upload (default: the newest); all_uploads: all.
        ok is false when any problem was found; each problem names upload and object.
        The run is remembered locally (forget always keeps the newest upload that passed
        "open").
        """
        from akosha_sync.repository.service import verify_uploads

        async def work(progress: Progress) -> Any:
            return await verify_uploads(
                config, upload_id=upload_id, all_uploads=all_uploads,
                read_data="100%" if level in ("read-data", "open") else None,
                open_databases=level == "open", progress=progress,
            )

        return dict(await _reported(ctx, work))

    @server.tool(annotations=DESTRUCTIVE)
    async def akosha_restore(
        ctx: Context,
        upload_id: Annotated[str | None, _about(
            "the upload to restore (default: the newest, or the newest at or before at)"
        )] = None,
        system_id: Annotated[str | None, _about(
            "restore another machine's upload (the new-laptop case)")] = None,
        at: Annotated[str | None, _about(
            "an ISO 8601 time: the newest upload at or before it")] = None,
        to: Annotated[str | None, _about(
            "an absolute target folder (default: the configured data_dir)")] = None,
        confirm_token: Annotated[str | None, _about(
            "the token a call without it returned: restores the plan it showed")] = None,
    ) -> dict[str, Any]:
        """Restore Session-Buddy's databases from an upload in the bucket.

        Without confirm_token: nothing is written; returns the plan (which upload, which
        files go where, which existing files would be kept as NAME.bak-<time>) and a
        confirm_token. Call again with the same arguments and that token to restore
        (progress is reported). upload_id: default the newest (at or before "at", an ISO
        time); system_id: another machine's uploads; to: target folder (default the
        configured data_dir). Close Session-Buddy first: open databases are refused.
        """
        args = {"upload_id": upload_id, "system_id": system_id, "at": at, "to": to}
        try:
            plan = await _plan(config, args)
        except Exception as exc:
            raise _fail(exc) from exc
        now = time.monotonic()
        for token, (expires, _, _) in list(pending.items()):
            if expires < now:
                pending.pop(token)

        def offer(**extra: Any) -> dict[str, Any]:
            token = secrets.token_urlsafe(16)
            pending[token] = (now + TOKEN_TTL, args, _plan_identity(plan))
            return {"confirmed": False, **extra, "plan": plan, "confirm_token": token,
                    "expires_in_seconds": int(TOKEN_TTL),
                    "next": "call akosha_restore again with the same arguments and "
                            "confirm_token to restore"}

        if confirm_token is None:
            return offer()
        held = pending.pop(confirm_token, None)
        if held is None or held[1] != args:
            raise ToolError(
                "confirm_token is unknown, expired, used, or was issued for other arguments; "
                "call akosha_restore without it to get a fresh plan and token."
            )
        if held[2] != _plan_identity(plan):
            # Nothing restored; the new plan comes with its own token, to review first.
            return offer(plan_changed="the plan changed since the token was issued (a "
                         "newer upload, or the target folder changed); nothing was "
                         "restored. This is the new plan, with a new token.")
        if plan["problems"]:
            raise ToolError("; ".join(plan["problems"]))

        async def work(progress: Progress) -> Any:
            # The upload the plan named, even if a newer one arrived meanwhile.
            chosen = {**args, "upload_id": plan["upload_id"], "at": None}
            return await _restore(config, chosen, progress)

        return {"confirmed": True, "result": await _reported(ctx, work)}

    @server.tool(annotations=DESTRUCTIVE)
    async def akosha_forget(
        ctx: Context,
        keep_last: Annotated[int, _about("keep the newest N uploads")] = 0,
        keep_hourly: Annotated[int, _about(
            "keep the newest upload of each of the last N hours")] = 0,
        keep_daily: Annotated[int, _about("the same for the last N days")] = 0,
        keep_weekly: Annotated[int, _about("the same for the last N weeks")] = 0,
        keep_monthly: Annotated[int, _about("the same for the last N months")] = 0,
        keep_yearly: Annotated[int, _about("the same for the last N years")] = 0,
        keep_within: Annotated[str, _about(
            'keep every upload within this span of the newest, e.g. "30d", "12h", "1y6m"'
        )] = "",
        system_id: Annotated[str | None, _about(
            "another machine's uploads (default: this machine's)")] = None,
        dry_run: Annotated[bool, _about(
            "only report the decisions (default); false deletes")] = True,
        upload_ids: Annotated[list[str] | None, _about(
            "instead of a policy: forget exactly these uploads (damaged ones)")] = None,
    ) -> dict[str, Any]:
        """Apply a retention policy (restic's forget): returns each upload's decision and
        its reasons. Deletes only with dry_run=false (manifests and the upload's small
        objects; shared data goes at the next prune). The newest upload, the newest
        that passed verify "open" and the newest holding each database are always kept;
        an empty policy is refused.
        keep_within: e.g. "30d", "12h", "1y6m", counted from the newest upload.
        upload_ids: instead of a policy, forget exactly these uploads (damaged ones).
        """
        from akosha_sync.repository.retention import Policy
        from akosha_sync.repository.service import forget_uploads

        policy = Policy(
            keep_last=keep_last, keep_hourly=keep_hourly, keep_daily=keep_daily,
            keep_weekly=keep_weekly, keep_monthly=keep_monthly, keep_yearly=keep_yearly,
            keep_within=keep_within,
        )

        async def work(progress: Progress) -> Any:
            return await forget_uploads(config, policy, system_id=system_id,
                                        dry_run=dry_run, progress=progress,
                                        upload_ids=upload_ids)

        return dict(await _reported(ctx, work))

    @server.tool(annotations=DESTRUCTIVE)
    async def akosha_prune(
        ctx: Context,
        system_id: Annotated[str | None, _about(
            "another machine's data (default: this machine's)")] = None,
        dry_run: Annotated[bool, _about(
            "only report what would be deleted (default); false deletes")] = True,
        wait_seconds: Annotated[float, _about(
            "how long to wait for syncs that started before the deletion plan, 0 to 900"
        )] = 120.0,
    ) -> dict[str, Any]:
        """Delete what no committed upload needs (after akosha_forget) and repack packs
        that are mostly unused; safe while other machines keep syncing (restic's prune).
        Returns what is (dry_run=true, the default) or was deleted, bytes freed, packs
        repacked. Deletes only with dry_run=false.
        wait_seconds: how long to wait for syncs that started before the deletion plan
        (0 to 900, default 120); if one still runs, nothing is deleted and a note says to
        run prune again later.
        """
        from akosha_sync.repository.service import prune_unused

        if not 0 <= wait_seconds <= PRUNE_WAIT_MAX:
            raise ToolError(f"wait_seconds must be between 0 and {PRUNE_WAIT_MAX:g} "
                            f"(got {wait_seconds:g})")

        async def work(progress: Progress) -> Any:
            return await prune_unused(config, system_id=system_id, dry_run=dry_run,
                                      wait_seconds=wait_seconds, progress=progress)

        return dict(await _reported(ctx, work))


def _plan_identity(plan: dict[str, Any]) -> dict[str, Any]:
    """What a confirmation must match: the upload and what happens to which file."""
    return {
        "upload_id": plan["upload_id"],
        "files": [(f["path"], f["sha256"], f["replaces"]) for f in plan["files"]],
        "set_aside": [f["path"] for f in plan["set_aside"]],
    }


def _parse_at(at: str | None) -> datetime | None:
    if not at:
        return None
    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00"))
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"at {at!r} is not an ISO 8601 time like 2026-06-01T12:00:00Z, "
                         "within the years 1 to 9999") from exc


def _target(config: AkoshaSyncConfig, to: str | None) -> Path:
    if not to:
        return config.data_path
    target = Path(to).expanduser()
    if not target.is_absolute():  # it would land in whatever folder the daemon runs in
        raise ValueError(f"to {to!r} is a relative path; give the folder as an absolute "
                         "path (or ~/...), or omit it for the configured data_dir")
    return target


async def _plan(config: AkoshaSyncConfig, args: dict[str, Any]) -> dict[str, Any]:
    from akosha_sync.repository.restore import prepare_restore
    from akosha_sync.repository.store import make_store

    target = _target(config, args["to"])
    plan, _, _ = await prepare_restore(
        make_store(config), config, system_id=args["system_id"] or config.system_id_resolved,
        target=target, upload_id=args["upload_id"], at=_parse_at(args["at"]), force=True,
        check_objects=True,
    )
    shown = dict(msgspec.to_builtins(plan))
    for field in ("problems", "notes"):
        shown[field] = [in_tool_terms(text) for text in shown[field]]
    return shown


async def _restore(config: AkoshaSyncConfig, args: dict[str, Any], progress: Progress) -> Any:
    from akosha_sync.repository.restore import restore
    from akosha_sync.repository.store import make_store
    from akosha_sync.sync.state import restoring_into

    target = _target(config, args["to"])
    async with restoring_into(config, target):  # no sync of this daemon meanwhile
        return await restore(
            make_store(config), config,
            system_id=args["system_id"] or config.system_id_resolved, target=target,
            upload_id=args["upload_id"], at=_parse_at(args["at"]), force=True,
            progress=progress,
        )
