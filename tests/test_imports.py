"""Import hygiene of the CLI's sync: a cloud-only ``akosha-sync sync`` starts lean.

The MCP SDK (~1 s and ~60 MB at import) belongs to the HTTP method only, and an
unchanged re-sync does not need DuckDB (~0.1 s, ~30 MB). Each sync runs the real CLI entry
point in a fresh interpreter against the real SeaweedFS, then reports which of the
heavy modules got loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from akosha_sync.config import AkoshaSyncConfig

MakeConfig = Callable[..., AkoshaSyncConfig]

_HEAVY = ("mcp", "httpx", "httpx2", "duckdb", "zstandard")


def _toml(config: AkoshaSyncConfig, path: Path) -> Path:
    keys = (
        "cloud_bucket", "cloud_endpoint", "access_key_id", "secret_access_key", "system_id",
        "data_dir", "state_dir", "log_file", "akosha_url", "force_method", "enable_fallback",
        "export_memories",
    )
    lines = []
    for key in keys:
        value = getattr(config, key)
        lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _sync_in_fresh_process(toml: Path) -> dict[str, Any]:
    code = (
        "import json, sys\n"
        "from akosha_sync.cli import main\n"
        f"rc = main(['--config', {str(toml)!r}, 'sync', '--json'])\n"
        f"heavy = {_HEAVY!r}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        "print(json.dumps({'rc': rc, 'loaded': loaded}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def test_cloud_only_sync_loads_no_mcp_and_unchanged_resync_no_duckdb(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    # The default plan (auto, with the HTTP fallback enabled) and the default export:
    # the fallback is only imported if the cloud fails.
    config = s3_config(force_method="auto", enable_fallback=True, export_memories=True)
    toml = _toml(config, tmp_path / "sync.toml")

    cold = _sync_in_fresh_process(toml)
    assert cold["rc"] == 0
    # httpx may load here: the first sync sweeps abandoned multipart uploads with our
    # own S3 client (repository/multipart.py); the MCP SDK and its httpx2 never.
    assert not {"mcp", "httpx2"} & set(cold["loaded"]), cold

    unchanged = _sync_in_fresh_process(toml)
    assert unchanged["rc"] == 0
    # zstandard (~2 MB, a few ms) may load: the blocks layout's pack writer builds its
    # compressor up front. No httpx: the sweep ran an hour ago at most.
    assert not {"mcp", "httpx", "httpx2", "duckdb"} & set(unchanged["loaded"]), unchanged
