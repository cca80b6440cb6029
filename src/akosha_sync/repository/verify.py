"""``verify``: check committed uploads against the bucket, at three levels.

* ``structure`` (always): the manifest parses; blocks layout: its index exists and
  parses, every pack it names is in the bucket with the recorded size, every piece
  lies inside its pack and the pieces add up to the file's size; files layout: every
  object the manifest names exists with its stored size (wherever it lies).
* ``read-data``: download the data and check it: every pack's SHA-256 is its id and
  every piece's SHA-256 (after decompression) its piece id; a whole object's stored
  and original SHA-256. ``SUBSET`` limits the download as restic's
  ``--read-data-subset``: ``n/t`` reads the n-th of t groups of data objects (grouped
  by object id, so t runs with n = 1..t read everything once), ``x%`` a random x
  percent.
* ``open``: restore into a temporary folder (``repository.restore``) and open each
  database with DuckDB; the rows of its main tables must equal the manifest's
  ``row_counts`` recorded at upload time.

Each problem names the upload and the object. Results are recorded per upload and
level (``repository.checks``).
"""

from __future__ import annotations

import hashlib
import random
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import msgspec
import obstore

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.checks import LevelResult, read_records, write_record
from akosha_sync.repository.damaged import record_damaged
from akosha_sync.repository.format import (
    LAYOUT_BLOCKS,
    Index,
    decode_index,
    index_mismatches,
    packs_prefix,
)
from akosha_sync.repository.manifest import MANIFEST_NAME, MEMORIES_NAME
from akosha_sync.repository.packs import PieceError, extract_piece
from akosha_sync.repository.snapshots import Upload, scan_uploads
from akosha_sync.repository.store import Refusal

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "Subset",
    "UploadCheck",
    "VerifyError",
    "VerifyReport",
    "parse_subset",
    "verify",
]

ProgressCallback = Callable[[str, int, int], None]


class VerifyError(Refusal, ValueError):
    """Nothing to verify: the upload asked for (or any committed one) is not there."""


class UploadCheck(msgspec.Struct, kw_only=True):
    upload_id: str
    system_id: str
    ok: bool = True
    objects_checked: int = 0
    pieces_read: int = 0
    bytes_read: int = 0
    problems: list[str] = msgspec.field(default_factory=list)
    notes: list[str] = msgspec.field(default_factory=list)

    def problem(self, key: str, text: str) -> None:
        self.ok = False
        self.problems.append(f"upload {self.upload_id}: {key}: {text}")


class VerifyReport(msgspec.Struct, kw_only=True):
    system_id: str
    level: str
    subset: str | None
    at: str
    ok: bool
    problem_count: int
    uploads: list[UploadCheck]
    incomplete: list[str] = msgspec.field(default_factory=list)


class Subset(msgspec.Struct, frozen=True):
    """Which data objects a ``read-data`` run downloads."""

    text: str
    n: int = 1
    t: int = 1
    percent: float = 100.0

    def selects(self, object_id: str, rng: random.Random) -> bool:
        if self.t > 1:
            return int(object_id[:8], 16) % self.t == self.n - 1
        if self.percent >= 100:
            return True
        return rng.random() * 100 < self.percent


_EVERYTHING = Subset("100%")
_FRACTION = re.compile(r"^(\d+)/(\d+)$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")


def parse_subset(text: str) -> Subset:
    """``n/t`` (1 <= n <= t) or ``x%`` (0 < x <= 100); ValueError with the fix else."""
    cleaned = text.strip()
    if match := _FRACTION.match(cleaned):
        n, t = int(match.group(1)), int(match.group(2))
        if 1 <= n <= t:
            return Subset(cleaned, n=n, t=t)
    elif match := _PERCENT.match(cleaned):
        pct = float(match.group(1))
        if 0 < pct <= 100:
            return Subset(cleaned, percent=pct)
    raise ValueError(
        f"--read-data subset {text!r} is not valid: use n/t (e.g. 1/5, n between 1 and t) "
        "or a percentage (e.g. 10%)."
    )


def _key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def _get(store: ObjectStore, key: str) -> bytes | None:
    try:
        return bytes(await (await obstore.get_async(store, key)).bytes_async())
    except FileNotFoundError:
        return None


async def _all_sizes(store: ObjectStore, system_id: str, uploads: list[Upload]) -> dict[str, int]:
    """Size of every upload object and pack of the system (two LISTs, no HEADs)."""
    sizes = {o.key: o.size for u in uploads for o in u.objects.values()}
    listed = await obstore.list(store, prefix=packs_prefix(system_id), chunk_size=1000
                                ).collect_async()
    sizes.update({m["path"]: int(m["size"]) for m in listed})
    return sizes


async def _check_structure(
    store: ObjectStore, upload: Upload, sizes: dict[str, int], check: UploadCheck
) -> Index | None:
    manifest = upload.manifest
    assert manifest is not None
    index: Index | None = None
    if upload.layout == LAYOUT_BLOCKS:
        key = manifest.index or ""
        raw = await _get(store, key) if key else None
        if raw is None:
            check.problem(key or "index.json", "the index is missing from the bucket")
            return None
        try:
            index = decode_index(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            check.problem(key, f"the index does not parse: {exc}")
            return None
        check.objects_checked += 1
        for pid, ref in index.packs.items():
            check.objects_checked += 1
            found = sizes.get(ref.key)
            if found is None:
                check.problem(ref.key, f"pack {pid[:16]} is missing from the bucket")
            elif found != ref.size:
                check.problem(ref.key, f"pack has {found} bytes, the index says {ref.size}")
        for name, entry in index.files.items():
            total = 0
            for piece in entry.pieces:
                total += piece.length
                where = index.packs.get(piece.pack_id)
                if where is None:
                    check.problem(key, f"{name}: piece {piece.sha256[:16]} names pack "
                                       f"{piece.pack_id[:16]}, which the index does not list")
                elif piece.offset + piece.stored_length > where.size:
                    check.problem(where.key, f"{name}: piece {piece.sha256[:16]} lies beyond "
                                             f"the pack's {where.size} bytes")
            if total != entry.size:
                check.problem(key, f"{name}: pieces add up to {total} bytes, the file has "
                                   f"{entry.size}")
        for name in manifest.file_details:
            if name != MEMORIES_NAME and name not in index.files:
                check.problem(key, f"the manifest lists {name} but the index does not")
        for problem in index_mismatches(manifest, index):
            check.problem(key, problem)
    for name, detail in manifest.file_details.items():
        if index is not None and name in index.files:
            continue
        check.objects_checked += 1
        found = sizes.get(detail.key)
        if found is None:
            check.problem(detail.key, f"{name} is missing from the bucket")
        elif found != detail.stored_size:
            check.problem(detail.key, f"{name} has {found} bytes, the manifest says "
                                      f"{detail.stored_size}")
    return index


async def _read_data(
    store: ObjectStore, upload: Upload, index: Index | None, check: UploadCheck,
    subset: Subset, rng: random.Random, done: set[str],
    seen: dict[str, set[tuple[int, str]]], damaged: set[str],
) -> None:
    manifest = upload.manifest
    assert manifest is not None
    if index is not None:
        by_pack: dict[str, list[tuple[str, int]]] = {}
        for name, entry in index.files.items():
            for number, piece in enumerate(entry.pieces):
                by_pack.setdefault(piece.pack_id, []).append((name, number))
        for pid, uses in by_pack.items():
            ref = index.packs.get(pid)
            if ref is None or not subset.selects(pid, rng):
                continue
            wanted = {
                (index.files[n].pieces[i].offset, index.files[n].pieces[i].sha256)
                for n, i in uses
            }
            if wanted <= seen.get(pid, set()):
                continue  # this run already read this pack and these very pieces
            before = len(check.problems)
            data = await _get(store, ref.key)
            if data is None:
                check.problem(ref.key, f"pack {pid[:16]} is missing from the bucket")
                continue
            check.bytes_read += len(data)
            if hashlib.sha256(data).hexdigest() != pid:
                check.problem(ref.key, "the pack's SHA-256 is not its id: the pack is "
                                       f"damaged. {_DAMAGED_ADVICE}")
                damaged.add(ref.key)
            for name, number in uses:
                piece = index.files[name].pieces[number]
                try:
                    extract_piece(data, piece, where=ref.key)
                except PieceError as exc:
                    check.problem(ref.key, f"{name} piece {number}: {exc}")
                    damaged.add(ref.key)
                check.pieces_read += 1
            if len(check.problems) == before:  # a damaged pack is reported for every user
                seen.setdefault(pid, set()).update(wanted)
    for name, detail in manifest.file_details.items():
        if index is not None and name in index.files:
            continue
        if detail.key in done or not subset.selects(_key_id(detail.key), rng):
            continue
        data = await _get(store, detail.key)
        if data is None:
            check.problem(detail.key, f"{name} is missing from the bucket")
            continue
        check.bytes_read += len(data)
        check.pieces_read += 1
        if hashlib.sha256(data).hexdigest() != detail.stored_sha256:
            check.problem(detail.key, f"{name}: the stored bytes do not match their SHA-256. "
                                      f"{_DAMAGED_ADVICE}")
            damaged.add(detail.key)
            continue
        if detail.compression:
            import zstandard

            try:
                data = zstandard.ZstdDecompressor().decompress(
                    data, max_output_size=max(detail.original_size, 1)
                )
            except zstandard.ZstdError as exc:
                check.problem(detail.key, f"{name} does not decompress: {exc}")
                damaged.add(detail.key)
                continue
        if hashlib.sha256(data).hexdigest() != detail.sha256:
            check.problem(detail.key, f"{name}: the content does not match its SHA-256")
            damaged.add(detail.key)
            continue
        done.add(detail.key)  # sound: later uploads reusing it need not read it again


def _count_rows(path: Path) -> dict[str, int]:
    import duckdb

    from akosha_sync.repository.source import row_counts

    con = duckdb.connect(str(path))
    try:
        return row_counts(con)
    finally:
        con.close()


async def _open(
    store: ObjectStore, config: AkoshaSyncConfig, upload: Upload, check: UploadCheck,
    progress: ProgressCallback | None,
) -> bool:
    """Restore into a temporary folder and open each database; False when the restore
    itself failed (a damaged object)."""
    from akosha_sync.repository.restore import RestoreError, restore

    manifest = upload.manifest
    assert manifest is not None
    with tempfile.TemporaryDirectory(prefix="akosha-verify-") as tmp:
        target = Path(tmp)
        try:
            await restore(
                store, config, system_id=upload.system_id, target=target,
                upload_id=upload.upload_id, progress=progress,
            )
        except RestoreError as exc:
            # The error names the object at fault (a pack, most often), not the index.
            check.problem("restore into a temporary folder", f"failed: {exc}")
            return False
        for name, detail in manifest.file_details.items():
            if not name.endswith(".duckdb"):
                continue
            path = target / name
            try:
                counts = await anyio.to_thread.run_sync(_count_rows, path)
            except Exception as exc:  # DuckDB raises many kinds; each is a damaged file
                check.problem(detail.key, f"{name} does not open with DuckDB: {exc}")
                continue
            if detail.row_counts is None:
                check.notes.append(
                    f"{name}: opened; this upload recorded no row counts to compare"
                )
                continue
            for table, expected in sorted(detail.row_counts.items()):
                got = counts.get(table)
                if got != expected:
                    check.problem(
                        detail.key,
                        f"{name}: table {table} has {got} rows after restore, the manifest "
                        f"recorded {expected}",
                    )
    return True


_DAMAGED_ADVICE = (
    "The next sync stores what it holds again from the databases on disk (it reuses no "
    "damaged object); the uploads that need it cannot be restored: `akosha-sync forget "
    "UPLOAD_ID` them, then `akosha-sync prune`"
)


async def verify(
    store: ObjectStore,
    config: AkoshaSyncConfig,
    system_id: str,
    *,
    upload_id: str | None = None,
    all_uploads: bool = False,
    read_data: str | None = None,
    open_databases: bool = False,
    progress: ProgressCallback | None = None,
    now: Callable[[], datetime] | None = None,
) -> VerifyReport:
    """Check one upload (the newest by default), or all; record the results."""
    subset = parse_subset(read_data) if read_data is not None else None
    clock = now or (lambda: datetime.now(UTC))
    uploads = await scan_uploads(store, system_id)
    incomplete = [u.upload_id for u in uploads if u.manifest is None and not u.damaged]
    # A committed upload whose manifest does not parse is checked (and fails) like
    # the others: the newest upload may be one, and restore would pick it too.
    committed = [u for u in uploads if u.complete or u.damaged]
    if upload_id:
        chosen = [u for u in uploads if u.upload_id == upload_id]
        if not chosen:
            raise VerifyError(
                f"upload {upload_id} of system {system_id!r} is not in the bucket; "
                "`akosha-sync snapshots` lists them."
            )
    elif all_uploads:
        chosen = committed
    else:
        chosen = committed[-1:]
        if not chosen:
            raise VerifyError(f"system {system_id!r} has no committed upload to verify.")
    sizes = await _all_sizes(store, system_id, uploads)
    rng = random.Random()  # a sample, not a secret
    done: set[str] = set()  # whole objects read in this run
    seen: dict[str, set[tuple[int, str]]] = {}  # pack id -> pieces read in this run
    damaged: set[str] = set()  # objects whose bytes are not what their uploads recorded
    levels = ["structure"] + (["read-data"] if subset else []) + (
        ["open"] if open_databases else [])
    checks: list[UploadCheck] = []
    for position, upload in enumerate(chosen):
        if progress:
            progress(f"verify:{upload.upload_id}", position, len(chosen))
        check = UploadCheck(upload_id=upload.upload_id, system_id=system_id)
        checks.append(check)
        if upload.manifest is None:
            where = upload.objects.get(MANIFEST_NAME)
            check.problem(
                where.key if where else f"{upload.upload_id}/{MANIFEST_NAME}",
                upload.problem or "no manifest",
            )
            continue
        index = await _check_structure(store, upload, sizes, check)
        if subset is not None:
            await _read_data(store, upload, index, check, subset, rng, done, seen, damaged)
        if open_databases and check.ok:
            if not await _open(store, config, upload, check, progress) and subset is None:
                # Find what is damaged and record it, as read-data does: else the next
                # sync reuses it and its upload cannot be restored either.
                await _read_data(store, upload, index, check, _EVERYTHING, rng, done, seen,
                                 damaged)
        elif open_databases:
            check.notes.append("not opened: the structure or data checks failed")
    if progress:
        progress("verify", len(chosen), len(chosen))
    if damaged:  # later syncs store those pieces again instead of pointing at them
        await record_damaged(store, system_id, damaged, set(sizes))
    at = clock().isoformat().replace("+00:00", "Z")
    records = await read_records(store, system_id)
    for check in checks:
        result = LevelResult(
            at=at, ok=check.ok, problems=len(check.problems),
            first_problem=check.problems[0] if check.problems else None,
        )
        record = records.get(check.upload_id)
        for level in levels:
            record = await write_record(store, system_id, check.upload_id, level, result,
                                        existing=record)
    problems = sum(len(c.problems) for c in checks)
    return VerifyReport(
        system_id=system_id,
        level="+".join(levels),
        subset=subset.text if subset else None,
        at=at,
        ok=problems == 0,
        problem_count=problems,
        uploads=checks,
        incomplete=incomplete,
    )
