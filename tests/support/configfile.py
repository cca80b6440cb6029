"""A configuration as the TOML file ``akosha-sync --config`` reads: what the CLI, daemon
and hook processes of the tests are started with."""

from __future__ import annotations

import json
from pathlib import Path

from akosha_sync.config import AkoshaSyncConfig

__all__ = ["write_toml"]


def write_toml(config: AkoshaSyncConfig, path: Path) -> Path:
    """Every field of ``config`` into ``path`` (its folder created); returns ``path``."""
    lines = []
    for key in config.__struct_fields__:
        value = getattr(config, key)
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
