"""Validation of Claude Code hook payloads (standard library only: the hook command
imports it and must start fast)."""

from __future__ import annotations

from typing import Any

__all__ = ["HookPayloadError", "validate_hook_payload"]

_HOOK_EVENTS = ("SessionEnd", "PreCompact")


class HookPayloadError(ValueError):
    """A hook body that is not a Claude Code SessionEnd/PreCompact payload."""


def validate_hook_payload(body: Any) -> dict[str, Any]:
    """Check a Claude Code hook body; return the part worth keeping."""
    if not isinstance(body, dict):
        raise HookPayloadError("the body must be a JSON object (Claude Code's hook input)")
    event = body.get("hook_event_name")
    if event not in _HOOK_EVENTS:
        raise HookPayloadError(
            f"hook_event_name is {event!r}; this route accepts "
            f"{' or '.join(_HOOK_EVENTS)} hook payloads only"
        )
    session_id = body.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise HookPayloadError("session_id is missing or not a string")
    keep = {"hook_event_name": event, "session_id": session_id}
    for key in ("reason", "trigger", "cwd", "transcript_path"):
        value = body.get(key)
        if isinstance(value, str):
            keep[key] = value[:500]
    return keep
