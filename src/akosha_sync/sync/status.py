"""What can be known about the sync without contacting anything: the seed's status
fields, the redacted configuration, its problems, the databases and the last upload."""

from __future__ import annotations

from typing import Any

import msgspec

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.store import describe_target
from akosha_sync.sync.cloud import load_cloud_state
from akosha_sync.sync.records import load_undeliverable
from akosha_sync.sync.snapshot import fingerprint

__all__ = ["local_status"]


def _last_verification(config: AkoshaSyncConfig) -> dict[str, Any] | None:
    from akosha_sync.repository.checks import load_last_run

    run = load_last_run(config.state_path)
    return msgspec.to_builtins(run) if run else None


def local_status(config: AkoshaSyncConfig) -> dict[str, Any]:
    sid = config.system_id_resolved
    state = None
    if config.cloud_configured:
        state = load_cloud_state(config)
    databases: dict[str, Any] = {}
    for name, path in config.database_paths.items():
        fp = fingerprint(path)
        stored = state.files.get(name) if state else None
        databases[name] = {
            "path": str(path),
            "exists": fp is not None,
            "size": fp.db.size if fp else 0,
            "wal": bool(fp and fp.wal),
            "changed_since_last_upload": (
                None if stored is None or fp is None else stored.fingerprint != fp
            ),
        }
    return {
        "cloud_configured": config.cloud_configured,
        "system_id": sid,
        "should_use_cloud": config.should_use_cloud,
        "should_use_http": config.should_use_http,
        "force_method": config.force_method,
        "enable_fallback": config.enable_fallback,
        "upload_on_session_end": config.upload_on_session_end,
        "configuration": config.redacted(),
        "validation_errors": config.validate(),
        "target": describe_target(config) if config.cloud_configured else None,
        "databases": databases,
        # Per method: records the last sync could not deliver (no embedding).
        "undeliverable": load_undeliverable(config.state_path),
        # Issue 7: the last `verify` run from this machine (repository.checks).
        "last_verification": _last_verification(config),
        "last_upload": (
            {"upload_id": state.last_upload_id, "manifest_key": state.last_manifest_key}
            if state and state.last_upload_id
            else None
        ),
    }
