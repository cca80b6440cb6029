"""``forget``: apply a retention policy to a system's committed uploads.

Forgetting an upload removes its ``manifest.json`` first (from then on no reader sees
it as a restore point), then the upload's own small objects (``index.json``,
``memories.json``, ``_claim.json``) and its verification record. Data that other
uploads may share (packs; database objects of the files layout, which later uploads
reuse in place) is left for ``prune``, which alone decides what no manifest needs.
Uploads without a manifest take no part: they are prune's business too.
A policy never forgets the newest upload holding a database (see ``retention``), so a
database that went missing on the machine keeps its last backup; explicit ids forget
exactly what they name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import obstore

from akosha_sync.repository.checks import check_key, read_records
from akosha_sync.repository.manifest import (
    CLAIM_NAME,
    MANIFEST_NAME,
    MEMORIES_NAME,
    Manifest,
)
from akosha_sync.repository.retention import Decision, Policy, apply_policy
from akosha_sync.repository.snapshots import Upload, scan_uploads
from akosha_sync.repository.store import Refusal

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "INDEX_NAME",
    "ForgetError",
    "ForgetReport",
    "databases_held",
    "forget",
    "own_small_objects",
]

INDEX_NAME = "index.json"
# Deleted after the manifest, in this order; the claim last (it marks the folder ours).
_SMALL = (INDEX_NAME, MEMORIES_NAME, CLAIM_NAME)
_WAL_SUFFIX = ".wal"


class ForgetError(Refusal):
    """The uploads named cannot be forgotten; the message says why."""


class ForgetReport(msgspec.Struct, kw_only=True):
    system_id: str
    policy: str
    dry_run: bool
    decisions: list[Decision]
    kept: list[str]
    forgotten: list[str]
    deleted_keys: list[str] = msgspec.field(default_factory=list)
    errors: list[str] = msgspec.field(default_factory=list)


def own_small_objects(upload: Upload) -> list[str]:
    """The keys ``forget`` deletes for ``upload``, manifest first."""
    names = [MANIFEST_NAME, *_SMALL]
    return [upload.objects[n].key for n in names if n in upload.objects]


def databases_held(manifest: Manifest) -> list[str]:
    """The databases an upload holds: its files but ``memories.json`` (derived from the
    databases) and WAL files (each goes with its database). Names are not matched on
    ``.duckdb``: the database file names are configurable."""
    return sorted(
        name for name in manifest.file_details
        if name != MEMORIES_NAME and not name.endswith(_WAL_SUFFIX)
    )


def newest_verified_open(uploads: list[Upload], passed: set[str]) -> str | None:
    complete = [u for u in uploads if u.complete and u.upload_id in passed]
    return complete[-1].upload_id if complete else None


async def forget(
    store: ObjectStore,
    system_id: str,
    policy: Policy,
    *,
    dry_run: bool,
    progress: Callable[[str, int, int], None] | None = None,
    upload_ids: list[str] | None = None,
) -> ForgetReport:
    """Decide with ``policy`` and (unless ``dry_run``) delete what it does not keep; or,
    with ``upload_ids`` (and an empty policy), forget exactly those uploads, as
    restic's ``forget ID``: the way to remove damaged ones, whatever their age.

    Raises ``RetentionError`` for an empty or invalid policy, ``ForgetError`` for ids
    that name no upload or come with a policy, before touching anything.
    """
    uploads = await scan_uploads(store, system_id)
    records = await read_records(store, system_id)
    if upload_ids:
        decisions, by_id = _named(uploads, upload_ids, policy, system_id)
        described = "upload ids " + " ".join(upload_ids)
    else:
        if policy.empty or policy.problems():
            apply_policy([], policy)  # raises with the reason
        passed = {uid for uid, record in records.items() if record.passed_open}
        complete = [u for u in uploads if u.complete]
        decisions = apply_policy(
            [(u.upload_id, u.time) for u in complete],
            policy,
            verified_open=newest_verified_open(complete, passed),
            holds={u.upload_id: databases_held(u.manifest) for u in complete if u.manifest},
        )
        by_id = {u.upload_id: u for u in complete}
        described = policy.describe()
    report = ForgetReport(
        system_id=system_id,
        policy=described,
        dry_run=dry_run,
        decisions=decisions,
        kept=[d.upload_id for d in decisions if d.keep],
        forgotten=[d.upload_id for d in decisions if not d.keep],
    )
    if dry_run:
        return report
    total = len(report.forgotten)
    for done, uid in enumerate(report.forgotten):
        if progress:
            progress(f"forget:{uid}", done, total)
        keys = [*own_small_objects(by_id[uid])]
        if uid in records:
            keys.append(check_key(system_id, uid))
        for key in keys:
            try:
                await obstore.delete_async(store, key)
            except FileNotFoundError:
                pass
            except Exception as exc:
                report.errors.append(f"{uid}: could not delete {key}: {str(exc)[:200]}")
                break
            report.deleted_keys.append(key)
    if progress:
        progress("forget", total, total)
    return report


def _named(
    uploads: list[Upload], upload_ids: list[str], policy: Policy, system_id: str
) -> tuple[list[Decision], dict[str, Upload]]:
    """Decisions that forget exactly ``upload_ids`` (committed, or with a damaged
    manifest) and keep every other committed upload."""
    if not policy.empty:
        raise ForgetError("give upload ids or a --keep-* policy, not both")
    listed = {u.upload_id: u for u in uploads if u.complete or u.damaged}
    unknown = [uid for uid in upload_ids if uid not in listed]
    if unknown:
        raise ForgetError(
            f"{', '.join(unknown)}: no such committed upload of system {system_id!r}; "
            "`akosha-sync snapshots` lists them."
        )
    named = set(upload_ids)
    decisions = [
        Decision(upload_id=u.upload_id, time=u.time.isoformat().replace("+00:00", "Z"),
                 keep=u.upload_id not in named,
                 reasons=["named" if u.upload_id in named else "not named"])
        for u in listed.values()
    ]
    return decisions, listed
