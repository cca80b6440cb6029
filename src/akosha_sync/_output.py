"""How the command line prints: JSON and sizes, shared by every command."""

from __future__ import annotations

from typing import Any

__all__ = ["as_json", "human_size"]


def as_json(data: Any) -> str:
    """``data`` as indented JSON (msgspec knows our Structs)."""
    import msgspec

    return msgspec.json.format(msgspec.json.encode(data), indent=2).decode()


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``: binary units, named as binary (restic and rclone do)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
