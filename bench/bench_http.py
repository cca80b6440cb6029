"""Benchmark the HTTP fallback against a real Akosha 0.11 (tests/support/akosha.py).

Two figures:

1. records per second through ``HttpSyncMethod.sync`` for N generated conversations
   (default 10,000; plus the sample's reflections and entities), from snapshot to the
   last batch marked delivered, and the same again for a second sync with nothing new;
2. the time from "cloud refused" to the HTTP fallback starting: ``HybridAkoshaSync``
   in ``auto`` mode with a cloud endpoint on a free port nobody listens on, measured
   from the cloud attempt's start to the first progress event of the HTTP method.

Run (needs the Akosha venv; ``make akosha-venv`` builds it)::

    .venv/bin/python bench/bench_http.py [--conversations 10000] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import create_sample_databases
from akosha_sync.sync.http import HttpSyncMethod
from akosha_sync.sync.hybrid import HybridAkoshaSync
from support.akosha import AkoshaServer, pick_free_port


def _config(data_dir: Path, state_dir: Path, akosha_url: str, **extra: Any) -> AkoshaSyncConfig:
    return AkoshaSyncConfig(
        data_dir=str(data_dir),
        state_dir=str(state_dir),
        akosha_url=akosha_url,
        max_retries=1,
        retry_backoff_seconds=0.1,
        upload_timeout_seconds=1800,
        **extra,
    )


async def _throughput(work: Path, data: Path, akosha: AkoshaServer, run: int) -> dict[str, Any]:
    """One full HTTP sync of ``data`` (a fresh system id: new ids for Akosha), then a resync."""
    config = _config(data, work / f"state-{run}", akosha.url, system_id=f"bench-{run}")
    method = HttpSyncMethod(config)
    first_send: list[float] = []
    started = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        if phase.startswith("send:") and not first_send:
            first_send.append(time.perf_counter() - started)

    result = await method.sync(progress=progress)
    elapsed = time.perf_counter() - started
    assert result["success"], result["error"]
    sent = sum(result["details"]["sent"].values())
    assert sum(result["details"]["stored"].values()) == sent
    second_started = time.perf_counter()
    again = await method.sync()
    second = time.perf_counter() - second_started
    assert sum(again["details"]["sent"].values()) == 0
    return {
        "records": sent,
        "calls": result["details"]["calls"],
        "bytes": result["bytes_transferred"],
        "seconds": round(elapsed, 2),
        "records_per_second": round(sent / elapsed, 1),
        "mib_per_second": round(result["bytes_transferred"] / elapsed / 2**20, 2),
        "first_batch_answered_after_seconds": round(first_send[0], 2) if first_send else None,
        "resync_nothing_new_seconds": round(second, 3),
    }


async def _fallback(work: Path, data: Path, akosha: AkoshaServer, run: int) -> dict[str, Any]:
    """auto mode, cloud endpoint refused: how long until the HTTP method starts."""
    config = _config(
        data,
        work / f"fb-state-{run}",
        akosha.url,
        system_id=f"fallback-{run}",
        cloud_bucket="akosha-bench",
        cloud_endpoint=f"http://127.0.0.1:{pick_free_port()}",  # bound, closed: refused
        access_key_id="AKBENCH" + secrets.token_hex(6).upper(),
        secret_access_key=secrets.token_urlsafe(24),
    )
    hybrid = HybridAkoshaSync(config)
    marks: dict[str, float] = {}
    for name in ("cloud", "http"):
        method = hybrid._get_method(name)
        assert method is not None
        original = method.sync

        async def timed(*args: Any, _name: str = name, _sync: Any = original, **kw: Any) -> Any:
            marks[f"{_name}_start"] = time.perf_counter()
            try:
                return await _sync(*args, **kw)
            finally:
                marks[f"{_name}_end"] = time.perf_counter()

        method.sync = timed  # type: ignore[method-assign]
    started = time.perf_counter()
    result = await hybrid.sync_memories(force_method="auto")
    total = time.perf_counter() - started
    assert result["method"] == "http" and result["success"], result
    return {
        "cloud_attempt_seconds": round(marks["cloud_end"] - marks["cloud_start"], 3),
        "cloud_refused_to_http_start_seconds": round(marks["http_start"] - marks["cloud_end"], 3),
        "cloud_start_to_http_start_seconds": round(marks["http_start"] - marks["cloud_start"], 3),
        "total_seconds": round(total, 3),
        "records": sum(result["details"]["sent"].values()),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    # Only warnings and errors from the sync code: the figures are the output.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        big = create_sample_databases(work / "data", conversations=args.conversations)
        small = create_sample_databases(
            work / "small", conversations=20, reflections=2, entities=2, relations=0
        )
        print(f"generated {args.conversations} conversations in "
              f"{time.perf_counter() - began:.1f}s ({big.row_counts})", flush=True)
        with AkoshaServer(work / "akosha") as akosha:
            print(f"akosha up in {akosha.startup_seconds:.2f}s at {akosha.url}", flush=True)
            throughput = []
            for run in range(args.runs):
                figures = await _throughput(work, big.data_dir, akosha, run)
                print("throughput", json.dumps(figures), flush=True)
                throughput.append(figures)
            fallback = []
            for run in range(args.runs):
                figures = await _fallback(work, small.data_dir, akosha, run)
                print("fallback", json.dumps(figures), flush=True)
                fallback.append(figures)
    rates = [f["records_per_second"] for f in throughput]
    gaps = [f["cloud_refused_to_http_start_seconds"] for f in fallback]
    starts = [f["cloud_start_to_http_start_seconds"] for f in fallback]
    print(
        json.dumps(
            {
                "records_per_second_median": statistics.median(rates),
                "records_per_second_runs": rates,
                "cloud_refused_to_http_start_median_seconds": statistics.median(gaps),
                "cloud_start_to_http_start_median_seconds": statistics.median(starts),
                "cloud_start_to_http_start_runs": starts,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    anyio.run(main)
