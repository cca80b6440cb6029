"""Verification records: the last check of each upload, kept in the bucket.

Key: ``systems/{sid}/checks/{upload_id}.json``, one small object per upload holding
the latest result per level (``structure``, ``read-data``, ``open``). In the bucket,
not only on this machine, because ``forget`` must never remove the newest upload that
passed ``verify --open`` whichever machine (or the daemon) runs it, and a reinstalled
machine must still know. The last run is also copied to ``state_dir/last_verify.json``
so that ``status`` can show it without contacting the store. ``forget`` and ``prune``
remove the record of an upload they remove.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import obstore

from akosha_sync._fs import atomic_write

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "LEVELS",
    "CheckRecord",
    "LastRun",
    "LevelResult",
    "check_key",
    "checks_prefix",
    "load_last_run",
    "read_records",
    "save_last_run",
    "write_record",
]

LEVELS = ("structure", "read-data", "open")


class LevelResult(msgspec.Struct, frozen=True, kw_only=True):
    at: str  # ISO 8601 UTC
    ok: bool
    problems: int = 0
    first_problem: str | None = None


class CheckRecord(msgspec.Struct, kw_only=True):
    upload_id: str
    levels: dict[str, LevelResult] = msgspec.field(default_factory=dict)

    @property
    def last(self) -> tuple[str, LevelResult] | None:
        """The most recent check at any level."""
        if not self.levels:
            return None
        # The newest; of one run's levels (same time), the deepest.
        return max(
            self.levels.items(),
            key=lambda item: (item[1].at, LEVELS.index(item[0]) if item[0] in LEVELS else -1),
        )

    @property
    def passed_open(self) -> bool:
        """Passed ``verify --open``, and failed no check since (at any level): retention
        keeps such an upload, so a stale pass must not outlive damage found later."""
        result = self.levels.get("open")
        if result is None or not result.ok:
            return False
        return all(other.ok or other.at < result.at for other in self.levels.values())


def checks_prefix(system_id: str) -> str:
    return f"systems/{system_id}/checks/"


def check_key(system_id: str, upload_id: str) -> str:
    return f"{checks_prefix(system_id)}{upload_id}.json"


async def read_records(store: ObjectStore, system_id: str) -> dict[str, CheckRecord]:
    """Every upload's record (unreadable ones are skipped: they are only a report)."""
    out: dict[str, CheckRecord] = {}
    # collect_async: async iteration of a ListStream aborts at exit (see snapshots).
    for meta in await obstore.list(store, prefix=checks_prefix(system_id)).collect_async():
        key = meta["path"]
        try:
            raw = await (await obstore.get_async(store, key)).bytes_async()
            record = msgspec.json.decode(bytes(raw), type=CheckRecord)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            continue
        out[record.upload_id] = record
    return out


async def write_record(
    store: ObjectStore, system_id: str, upload_id: str, level: str, result: LevelResult,
    existing: CheckRecord | None = None,
) -> CheckRecord:
    """Store ``result`` as the upload's latest check at ``level``."""
    record = existing or CheckRecord(upload_id=upload_id)
    record.levels[level] = result
    await obstore.put_async(store, check_key(system_id, upload_id), msgspec.json.encode(record))
    return record


class LastRun(msgspec.Struct, kw_only=True):
    at: str
    level: str
    ok: bool
    uploads: list[str]
    problems: int


def save_last_run(state_dir: Path, run: LastRun) -> None:
    atomic_write(state_dir / "last_verify.json", msgspec.json.encode(run))  # 0600


def load_last_run(state_dir: Path) -> LastRun | None:
    try:
        return msgspec.json.decode((state_dir / "last_verify.json").read_bytes(), type=LastRun)
    except (FileNotFoundError, NotADirectoryError, msgspec.DecodeError, msgspec.ValidationError):
        return None
