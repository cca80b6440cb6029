"""``prune``: delete what no committed upload needs, repack mostly-dead packs, safely
while other machines and processes keep syncing into the same bucket.

What is garbage
===============
Kept: every object a committed upload (one with a ``manifest.json``) refers to: its
manifest, index, memories, claim, the packs its index lists, the whole objects its
files-layout manifest names (wherever they lie), and everything in the folder of an
upload *in flight* (a ``_claim.json`` without manifest, younger than
:data:`IN_FLIGHT_STALE`). Garbage: packs no index lists; objects in folders without a
manifest that are no longer in flight (forgotten uploads, syncs that died); packs
younger than the oldest in-flight claim are never garbage (they may be that upload's).
A pack whose live pieces fill less than :data:`REPACK_BELOW` of it is *repacked*: its
live pieces (stored bytes as they are) are copied into new packs and the indexes that
use it are rewritten, BEFORE the old pack is condemned.

The protocol (times are the store's ``LastModified``, never a local clock)
==========================================================================
1. **Lease.** ``systems/{sid}/locks/prune-lease.json`` is created with a conditional
   create. An existing lease younger than :data:`LEASE_STALE` (by the store's clock:
   the ``LastModified`` of a probe object written just now) makes prune refuse; an
   older one is stale (its prune died) and is replaced. A running prune renews its
   lease every :data:`LEASE_RENEW`, and checks that it still holds it (a token in the
   lease) before its plan and before it deletes anything: one held up for longer than
   a lease lasts (a machine asleep) finds it taken over and stops. Plan and lease are
   removed only by the prune whose token they hold. Syncs never take the lease: they
   are never blocked.
2. **Check.** If a committed upload already points at a missing object, or its
   manifest does not parse (what it needs is then unknown), prune refuses and names
   the upload and the object (deleting more could only hurt; run verify).
3. **Repack** (new packs are written, nothing is deleted yet).
4. **Plan.** ``systems/{sid}/locks/prune-plan.json`` lists every condemned key; its
   ``LastModified`` is *T_plan*. An upload writes its ``_claim.json`` and only then
   reads the plan (:func:`read_condemned`), and never reuses a condemned pack or object
   (it stores those pieces again). So an upload whose claim is younger than
   ``T_plan + PLAN_MARGIN`` cannot come to depend on a condemned object.
5. **Rewrite** the indexes of repacked uploads (same key, new piece locations).
6. **Wait** for every upload in flight whose claim is older than ``T_plan +
   PLAN_MARGIN`` (it may have read an older plan, or none, and reuse a condemned
   object) to commit, fail or go stale; if one is still running after ``wait_seconds``,
   prune stops here and leaves the plan in place for the next prune (uploads keep
   avoiding the condemned objects meanwhile, which is always safe).
7. **Sweep.** Re-read every manifest and index. Delete a condemned key only if no
   committed upload refers to it now and its ``LastModified`` is not newer than
   *T_plan* (an upload that stored identical bytes under the same pack id since
   re-wrote it; it is then kept).
8. Delete the plan, then the lease (each only if still this prune's); remove
   verification records of uploads gone.

Why a sync racing prune cannot end with a manifest pointing at a deleted object: an
object is deleted only at step 7. An upload either claimed before ``T_plan + margin``:
then step 6 waited until it committed, and step 7 sees its manifest and keeps what it
uses; or it claimed after: then it read the plan and uses no condemned object. An
interrupted prune leaves every kept upload whole: new packs and rewritten indexes
come before any deletion. One stopped by a signal or an error removes its plan and
then its lease (syncs may reuse what it condemned and did not delete: nothing deletes
it any more); one killed outright leaves both, and a stale plan only makes uploads
store more until the next prune replaces it.
Known limit: a restore reading an index while prune rewrites it may find an old pack
gone; it fails with a clear error and succeeds when run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import msgspec
import obstore
from obstore.exceptions import AlreadyExistsError

from akosha_sync.repository.checks import checks_prefix
from akosha_sync.repository.format import (
    LAYOUT_BLOCKS,
    Index,
    PackRef,
    Piece,
    decode_index,
    encode_index,
    pack_id_from_key,
    pack_key,
    packs_prefix,
)
from akosha_sync.repository.manifest import CLAIM_NAME, MANIFEST_NAME
from akosha_sync.repository.packs import name_pack
from akosha_sync.repository.snapshots import StoredObject, Upload, scan_uploads
from akosha_sync.repository.store import Refusal

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "IN_FLIGHT_STALE",
    "LEASE_STALE",
    "WAIT_SECONDS",
    "PruneError",
    "PruneReport",
    "condemned_pack_ids",
    "in_flight_rule",
    "lease_key",
    "plan_key",
    "prune",
    "read_condemned",
]

LEASE_STALE = timedelta(minutes=30)
LEASE_RENEW = timedelta(minutes=1)  # a running prune renews its lease this often
# Longer than the longest allowed sync (upload_timeout_seconds <= 3600).
IN_FLIGHT_STALE = timedelta(hours=2)
WAIT_SECONDS = 900.0  # how long prune waits for uploads in flight before it gives up
PLAN_MARGIN = timedelta(seconds=60)
REPACK_BELOW = 0.5  # live fraction under which a pack is rewritten
_REPACK_TARGET = 16 * 1024 * 1024

ProgressCallback = Callable[[str, int, int], None]


class PruneError(Refusal):
    """Prune refused to start or could not go on; the message says why and what to do."""


class PrunePlan(msgspec.Struct, kw_only=True):
    """``locks/prune-plan.json``: what this prune intends to delete."""

    host: str
    condemned: list[str]
    token: str = ""  # the lease's: only the prune holding that lease removes this plan


class PruneReport(msgspec.Struct, kw_only=True):
    system_id: str
    dry_run: bool
    deleted: list[str] = msgspec.field(default_factory=list)
    bytes_freed: int = 0
    repacked: list[str] = msgspec.field(default_factory=list)
    new_packs: list[str] = msgspec.field(default_factory=list)
    rewritten_indexes: list[str] = msgspec.field(default_factory=list)
    kept_referenced: list[str] = msgspec.field(default_factory=list)
    waited_for: list[str] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)
    errors: list[str] = msgspec.field(default_factory=list)


def lease_key(system_id: str) -> str:
    return f"systems/{system_id}/locks/prune-lease.json"


def plan_key(system_id: str) -> str:
    return f"systems/{system_id}/locks/prune-plan.json"


# ----------------------------------------------------------------- upload side
async def read_condemned(store: ObjectStore, system_id: str) -> frozenset[str]:
    """Keys a prune has condemned; an upload calls this AFTER writing its claim and
    reuses none of them (it stores those pieces again). Empty when no prune runs."""
    try:
        raw = await (await obstore.get_async(store, plan_key(system_id))).bytes_async()
        return frozenset(msgspec.json.decode(bytes(raw), type=PrunePlan).condemned)
    except FileNotFoundError:
        return frozenset()
    except (msgspec.DecodeError, msgspec.ValidationError):
        # A plan being written or damaged: safest is to reuse no pack at all.
        return frozenset({"*"})


def condemned_pack_ids(condemned: frozenset[str], listed: dict[str, int]) -> dict[str, int]:
    """``listed`` (pack id -> size) without the condemned packs (all, if unreadable)."""
    if "*" in condemned:
        return {}
    gone = {pid for key in condemned if (pid := pack_id_from_key(key))}
    return {pid: size for pid, size in listed.items() if pid not in gone}


# ----------------------------------------------------------------- helpers
async def _get(store: ObjectStore, key: str) -> bytes | None:
    try:
        return bytes(await (await obstore.get_async(store, key)).bytes_async())
    except FileNotFoundError:
        return None


async def _store_now(store: ObjectStore, system_id: str) -> datetime:
    """The store's clock: the LastModified of a probe written now."""
    key = f"systems/{system_id}/locks/clock-{secrets.token_hex(6)}.json"
    with anyio.CancelScope(shield=True):  # never left behind by a stopped prune
        await obstore.put_async(store, key, b"{}")
        try:
            meta = await obstore.head_async(store, key)
        finally:
            await obstore.delete_async(store, key)
    return meta["last_modified"]


async def _list(store: ObjectStore, prefix: str) -> dict[str, StoredObject]:
    found = await obstore.list(store, prefix=prefix, chunk_size=1000).collect_async()
    return {
        m["path"]: StoredObject(m["path"], int(m["size"]), m["last_modified"]) for m in found
    }


class _Repo(msgspec.Struct, kw_only=True):
    """A consistent-enough view of one system: uploads, indexes, packs."""

    uploads: list[Upload]
    indexes: dict[str, Index]  # upload id -> index (blocks layout)
    packs: dict[str, StoredObject]  # key -> object
    referenced: set[str]
    missing: list[str]


async def _read_repo(store: ObjectStore, system_id: str) -> _Repo:
    uploads = await scan_uploads(store, system_id)
    packs = await _list(store, packs_prefix(system_id))
    present = {o.key: o.size for u in uploads for o in u.objects.values()}
    present.update({k: o.size for k, o in packs.items()})
    indexes: dict[str, Index] = {}
    referenced: set[str] = set()
    missing: list[str] = []
    for upload in uploads:
        manifest = upload.manifest
        if upload.damaged:
            # Committed, but what it needs cannot be read: nothing is garbage for sure.
            missing.append(
                f"upload {upload.upload_id}: {upload.objects[MANIFEST_NAME].key} is damaged "
                f"({upload.problem}); if it cannot be mended, delete that manifest.json "
                "from the bucket by hand and the next prune removes the rest of the upload"
            )
        if manifest is None:
            continue
        referenced.update(o.key for o in upload.objects.values())
        index: Index | None = None
        if upload.layout == LAYOUT_BLOCKS and manifest.index:
            raw = await _get(store, manifest.index)
            if raw is None:
                missing.append(f"upload {upload.upload_id} needs {manifest.index} (missing)")
            else:
                try:
                    index = decode_index(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    missing.append(f"upload {upload.upload_id}: {manifest.index} is damaged "
                                   f"({exc})")
        if index is not None:
            indexes[upload.upload_id] = index
            for ref in index.packs.values():
                referenced.add(ref.key)
                if present.get(ref.key) != ref.size:
                    missing.append(f"upload {upload.upload_id} needs {ref.key} (missing or "
                                   f"not {ref.size} bytes)")
        for name, detail in manifest.file_details.items():
            if index is not None and name in index.files:
                continue
            referenced.add(detail.key)
            if present.get(detail.key) != detail.stored_size:
                missing.append(f"upload {upload.upload_id} needs {detail.key} ({name}; "
                               "missing or of the wrong size)")
    return _Repo(uploads=uploads, indexes=indexes, packs=packs, referenced=referenced,
                 missing=missing)


def _in_flight(upload: Upload, now: datetime, stale: timedelta) -> bool:
    claim = upload.objects.get(CLAIM_NAME)
    return upload.manifest is None and claim is not None and claim.last_modified > now - stale


def _garbage(
    repo: _Repo, now: datetime, stale: timedelta
) -> tuple[list[StoredObject], list[Upload]]:
    """Unreferenced objects prune may condemn, and the uploads in flight."""
    flying = [u for u in repo.uploads if _in_flight(u, now, stale)]
    oldest = min((u.objects[CLAIM_NAME].last_modified for u in flying), default=None)
    out: list[StoredObject] = []
    for upload in repo.uploads:
        if upload.manifest is not None or upload in flying:
            continue
        out.extend(o for o in upload.objects.values() if o.key not in repo.referenced)
    for key, obj in repo.packs.items():
        if key in repo.referenced:
            continue
        if oldest is not None and obj.last_modified >= oldest - PLAN_MARGIN:
            continue  # may be a pack of the upload in flight
        out.append(obj)
    return out, flying


def _live(repo: _Repo) -> dict[str, dict[int, Piece]]:
    """Per pack id: its live pieces by offset."""
    live: dict[str, dict[int, Piece]] = {}
    for index in repo.indexes.values():
        for entry in index.files.values():
            for piece in entry.pieces:
                live.setdefault(piece.pack_id, {})[piece.offset] = piece
    return live


# ----------------------------------------------------------------- the work
async def prune(
    store: ObjectStore,
    system_id: str,
    *,
    dry_run: bool,
    wait_seconds: float = WAIT_SECONDS,
    repack_below: float = REPACK_BELOW,
    in_flight_stale: timedelta = IN_FLIGHT_STALE,
    lease_stale: timedelta = LEASE_STALE,
    progress: ProgressCallback | None = None,
    on_planned: Callable[[], object] | None = None,
) -> PruneReport:
    """Run the protocol in the module docstring. ``in_flight_stale``: the grace period
    after which a claim without manifest is an abandoned upload. ``on_planned`` is a
    test seam called right after the plan is written (before any deletion)."""
    report = PruneReport(system_id=system_id, dry_run=dry_run)
    say = progress or (lambda phase, done, total: None)
    say("prune:scan", 0, 0)
    repo = await _read_repo(store, system_id)
    if repo.missing:
        raise PruneError(
            "refusing to prune: committed uploads are damaged or already point at missing "
            "objects, and deleting more could only make it worse. Run `akosha-sync verify "
            "--all` and forget the damaged uploads first (`akosha-sync forget UPLOAD_ID "
            "...`): " + "; ".join(repo.missing[:10])
        )
    if not repo.uploads and not repo.packs:  # nothing to read the clock for, or to lock
        report.notes.append(
            f"system {system_id!r} has no uploads and no packs in the bucket: nothing to "
            "prune. `akosha-sync snapshots --all-systems` lists the systems there."
        )
        return report
    now = await _store_now(store, system_id) if not dry_run else max(
        [o.last_modified for u in repo.uploads for o in u.objects.values()]
        + [o.last_modified for o in repo.packs.values()],
        default=datetime.now(UTC),
    )
    garbage, flying = _garbage(repo, now, in_flight_stale)
    live = _live(repo)
    sparse: dict[str, StoredObject] = {}
    for key, obj in repo.packs.items():
        pid = pack_id_from_key(key)
        if pid is None or key not in repo.referenced:
            continue
        used = sum(p.stored_length for p in live.get(pid, {}).values())
        if obj.size and used < repack_below * obj.size:
            sparse[pid] = obj
    if dry_run:
        report.deleted = sorted(o.key for o in garbage) + sorted(o.key for o in sparse.values())
        report.bytes_freed = sum(o.size for o in garbage) + sum(
            o.size - sum(p.stored_length for p in live.get(pid, {}).values())
            for pid, o in sparse.items()
        )
        report.repacked = sorted(sparse)
        if garbage or sparse:  # with nothing condemned there is nothing to wait for
            report.waited_for = [u.upload_id for u in flying]
        return report

    lease = _Lease(store, system_id)
    # Shielded: cancelled while its answer is on the way, the lease would be in the
    # bucket but not known to be ours, and refuse every prune for LEASE_STALE.
    with anyio.CancelScope(shield=True):
        await lease.take(now, lease_stale)
    try:
        await _run_locked(store, system_id, repo, garbage, sparse, live, report,
                          wait_seconds, in_flight_stale, say, on_planned, lease)
    except BaseException:
        # Stopped (Ctrl-C, SIGTERM, an error): nothing more will be deleted, so the plan
        # would only make every sync store its pieces again until the next prune.
        with anyio.CancelScope(shield=True):
            await _remove_plan(store, system_id, lease.token)
        raise
    finally:
        # Shielded: an interrupted prune (Ctrl-C, SIGTERM) must not leave its lease to
        # refuse every other prune for LEASE_STALE.
        with anyio.CancelScope(shield=True):
            await lease.release()
    return report


class _Lease:
    """This prune's hold on ``locks/prune-lease.json``, told apart from another's by a
    token. It is renewed while the prune runs (every :data:`LEASE_RENEW`), so only a
    prune that stopped (killed, or on a machine asleep) goes stale; and before it
    deletes anything the prune checks that it still holds it. One that finds its lease
    taken over stops: the prune that took it may have removed its plan, and syncs may
    since have reused what it condemned."""

    def __init__(self, store: ObjectStore, system_id: str) -> None:
        self.store = store
        self.key = lease_key(system_id)
        self.token = secrets.token_hex(8)
        self.checked = time.time()  # the wall clock: it runs on while a machine sleeps

    def _body(self) -> bytes:
        return msgspec.json.encode({"host": socket.gethostname(), "token": self.token,
                                    "at": datetime.now(UTC).isoformat()})

    async def take(self, now: datetime, stale: timedelta) -> None:
        for _ in range(2):
            try:
                await obstore.put_async(self.store, self.key, self._body(), mode="create")
                self.checked = time.time()
                return
            except AlreadyExistsError:
                pass
            try:
                meta = await obstore.head_async(self.store, self.key)
            except FileNotFoundError:
                continue
            if meta["last_modified"] > now - stale:
                raise PruneError(
                    f"another prune holds the lease {self.key} (renewed "
                    f"{meta['last_modified']:%Y-%m-%d %H:%M:%S} UTC); wait for it to "
                    f"finish. A lease not renewed for {int(stale.total_seconds() // 60)} "
                    "minutes is taken over."
                )
            await obstore.delete_async(self.store, self.key)  # stale: its prune died
        raise PruneError(f"could not take the prune lease {self.key}; try again.")

    async def _ours(self) -> bool:
        raw = await _get(self.store, self.key)
        if raw is None:
            return False
        try:
            found = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return False
        return isinstance(found, dict) and found.get("token") == self.token

    async def renew(self, *, every: float | None = None) -> None:
        """Raise :class:`PruneError` if the lease is no longer ours, else renew it;
        with ``every``, only once that many seconds have passed since the last time."""
        if every is not None and time.time() - self.checked < every:
            return
        if not await self._ours():
            raise PruneError(
                f"this prune's lease {self.key} was taken over by another prune (this one "
                "was held up for longer than a lease lasts: a machine asleep?); it stops "
                "here and deletes nothing more. Run prune again."
            )
        await obstore.put_async(self.store, self.key, self._body())
        self.checked = time.time()

    async def release(self) -> None:
        """Remove the lease if it is still ours (best effort: it goes stale anyway)."""
        with contextlib.suppress(Exception):
            if await self._ours():
                await obstore.delete_async(self.store, self.key)


async def _remove_plan(store: ObjectStore, system_id: str, token: str | None) -> None:
    """Remove the plan if this prune wrote it (``token``); None: whoever wrote it (a
    prune that stopped earlier, when this one holds the lease and condemns nothing)."""
    raw = await _get(store, plan_key(system_id))
    if raw is None:
        return
    if token is not None:
        try:
            if msgspec.json.decode(raw, type=PrunePlan).token != token:
                return  # another prune's, which took over our lease
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
    with contextlib.suppress(FileNotFoundError):
        await obstore.delete_async(store, plan_key(system_id))


async def _repack(
    store: ObjectStore, system_id: str, sparse: dict[str, StoredObject],
    live: dict[str, dict[int, Piece]], report: PruneReport, existing: set[str],
) -> dict[tuple[str, int], tuple[Piece, PackRef]]:
    """Copy the live pieces of ``sparse`` packs into new packs; old location -> new."""
    moved: dict[tuple[str, int], tuple[Piece, PackRef]] = {}
    buffer = bytearray()
    pending: list[tuple[str, Piece, int]] = []

    async def seal() -> None:
        if not pending:
            return
        data = bytearray(buffer)
        # Never the key of a pack already there: one this prune condemns (identical
        # bytes, by chance) would be deleted in the sweep under the rewritten indexes.
        pid = name_pack(data, lambda p: pack_key(system_id, p) in existing)
        ref = PackRef(pack_key(system_id, pid), len(data))
        await obstore.put_async(store, ref.key, bytes(data), use_multipart=False)
        report.new_packs.append(pid)
        for old_pid, piece, offset in pending:
            moved[(old_pid, piece.offset)] = (
                msgspec.structs.replace(piece, pack_id=pid, offset=offset), ref
            )
        buffer.clear()
        pending.clear()

    for old_pid, obj in sorted(sparse.items()):
        data = await _get(store, obj.key)
        if data is None or hashlib.sha256(data).hexdigest() != old_pid:
            report.errors.append(f"{obj.key}: could not be read whole for repacking; kept")
            continue
        for offset in sorted(live.get(old_pid, {})):
            piece = live[old_pid][offset]
            if len(buffer) + piece.stored_length > _REPACK_TARGET:
                await seal()
            pending.append((old_pid, piece, len(buffer)))
            buffer += data[offset: offset + piece.stored_length]
        report.repacked.append(old_pid)
    await seal()
    return moved


def _rewrite(index: Index, moved: dict[tuple[str, int], tuple[Piece, PackRef]]) -> Index | None:
    """``index`` with moved pieces at their new places; None when it uses none of them."""
    changed = False
    files = {}
    for name, entry in index.files.items():
        pieces = []
        for piece in entry.pieces:
            new = moved.get((piece.pack_id, piece.offset))
            if new is not None:
                changed = True
                pieces.append(new[0])
            else:
                pieces.append(piece)
        files[name] = msgspec.structs.replace(entry, pieces=pieces)
    if not changed:
        return None
    refs = {**index.packs, **{p.pack_id: r for p, r in moved.values()}}
    used = {p.pack_id for entry in files.values() for p in entry.pieces}
    return Index(
        version=index.version, upload_id=index.upload_id, system_id=index.system_id,
        packs={pid: ref for pid, ref in refs.items() if pid in used}, files=files,
    )


async def _run_locked(
    store: ObjectStore, system_id: str, repo: _Repo, garbage: list[StoredObject],
    sparse: dict[str, StoredObject], live: dict[str, dict[int, Piece]],
    report: PruneReport, wait_seconds: float, stale: timedelta, say: ProgressCallback,
    on_planned: Callable[[], object] | None, lease: _Lease,
) -> None:
    say("prune:repack", 0, len(sparse))
    moved = await _repack(store, system_id, sparse, live, report, set(repo.packs)) if sparse else {}
    repacked = {sparse[pid].key: sparse[pid] for pid in report.repacked}
    condemned = {o.key: o for o in garbage} | repacked
    if not condemned:
        # Nothing to delete: no plan, and no upload in flight to wait for (one left by
        # a killed sync would hold prune up for nothing). A plan an earlier prune left
        # (it stopped waiting) condemns nothing any more: remove it.
        await lease.renew()
        await _remove_plan(store, system_id, None)
        # Read again: a record written since the first scan may be of an upload made
        # since (and one that passed `verify --open` is what retention protects).
        await _drop_records(store, system_id, await scan_uploads(store, system_id))
        return
    # 4. The plan, then its store time.
    await lease.renew()
    plan = PrunePlan(host=socket.gethostname(), condemned=sorted(condemned),
                     token=lease.token)
    # Shielded: a PUT cancelled on our side still lands in the store, after the clean-up
    # of a stopped prune had removed the plan.
    with anyio.CancelScope(shield=True):
        await obstore.put_async(store, plan_key(system_id), msgspec.json.encode(plan))
    t_plan = (await obstore.head_async(store, plan_key(system_id)))["last_modified"]
    if on_planned is not None:
        on_planned()
    # 5. Rewrite the indexes that use repacked packs (before anything is deleted).
    for uid, index in repo.indexes.items():
        new = _rewrite(index, moved)
        if new is None:
            continue
        upload = next(u for u in repo.uploads if u.upload_id == uid)
        key = upload.manifest.index if upload.manifest else None
        if key:
            await obstore.put_async(store, key, encode_index(new))
            report.rewritten_indexes.append(key)
    # 6. Wait for uploads that may not have seen the plan.
    deadline = time.monotonic() + wait_seconds
    while True:
        uploads = await scan_uploads(store, system_id)
        now = await _store_now(store, system_id)
        old = [
            u.upload_id for u in uploads if _in_flight(u, now, stale)
            and u.objects[CLAIM_NAME].last_modified < t_plan + PLAN_MARGIN
        ]
        if not old:
            break
        report.waited_for = sorted(set(report.waited_for) | set(old))
        if time.monotonic() >= deadline:
            report.notes.append(
                f"uploads {', '.join(old)} had not committed after {wait_seconds:.0f} s: "
                f"syncs still running, or killed ones ({in_flight_rule(stale)}); nothing "
                "was deleted. The plan stays; run prune again later."
            )
            return
        say("prune:wait", 0, len(old))
        await lease.renew(every=LEASE_RENEW.total_seconds())
        await anyio.sleep(1.0)
    # 7. Sweep: only what no committed upload refers to now, unchanged since the plan.
    await lease.renew()
    again = await _read_repo(store, system_id)
    current = {o.key: o for u in again.uploads for o in u.objects.values()} | again.packs
    total = len(condemned)
    for done, (key, planned) in enumerate(sorted(condemned.items())):
        say("prune:delete", done, total)
        if key in again.referenced:
            report.kept_referenced.append(key)
            continue
        now_obj = current.get(key)
        if now_obj is None:
            continue
        if now_obj.last_modified > t_plan:
            report.kept_referenced.append(key)  # re-written since the plan: someone's
            continue
        await lease.renew(every=LEASE_RENEW.total_seconds())  # still ours after a sleep?
        try:
            await obstore.delete_async(store, key)
        except FileNotFoundError:
            continue
        report.deleted.append(key)
        report.bytes_freed += planned.size
    # 8. Remove the plan, and the records of uploads that are gone.
    await _remove_plan(store, system_id, lease.token)
    await _drop_records(store, system_id, again.uploads)
    say("prune:delete", total, total)


async def _drop_records(store: ObjectStore, system_id: str, uploads: list[Upload]) -> None:
    """Remove the verification records of uploads that are gone."""
    present = {u.upload_id for u in uploads if u.manifest is not None or u.damaged}
    for key in await _list(store, checks_prefix(system_id)):
        uid = key.rsplit("/", 1)[-1].removesuffix(".json")
        if uid not in present:
            await obstore.delete_async(store, key)


def in_flight_rule(stale: timedelta = IN_FLIGHT_STALE) -> str:
    """Why a killed sync holds prune up, in the words prune's messages use."""
    hours = stale.total_seconds() / 3600
    return (f"a claim without a manifest counts as in flight for {hours:g} "
            f"hour{'' if hours == 1 else 's'} after it was made")
