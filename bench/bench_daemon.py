"""Daemon figures: hook-route latency while a real sync runs, start-up to the first
answered ``initialize``, ``akosha_sync_status`` latency, and the hook command's start.

    python bench/bench_daemon.py [--size-mb 250] [--posts 200]

Everything is real: SeaweedFS on free loopback ports, the daemon as a subprocess
(`akosha-sync serve --transport http --port 0`), the MCP SDK's HTTP client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from akosha_sync.sample import grow_to_size  # noqa: E402
from support.seaweedfs import SeaweedFS  # noqa: E402

EXE = str(Path(sys.executable).with_name("akosha-sync"))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _wait_daemon(state: Path, proc: subprocess.Popen[bytes], deadline: float) -> str:
    info = state / "daemon.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("daemon exited during start")
        try:
            data = json.loads(info.read_text())
            if data.get("pid") == proc.pid:
                return str(data["url"])
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise SystemExit("daemon did not start")


async def _first_initialize(url: str, deadline: float) -> float:
    """Seconds until an MCP initialize over streamable HTTP is answered."""
    while time.monotonic() < deadline:
        try:
            async with Client(f"{url}/mcp"):
                return time.monotonic()
        except Exception:  # not listening yet
            await anyio.sleep(0.005)
    raise SystemExit("no initialize answer")


async def _status_latency(url: str, n: int) -> list[float]:
    out: list[float] = []
    async with Client(f"{url}/mcp") as client:
        for _ in range(n):
            started = time.perf_counter()
            await client.call_tool("akosha_sync_status", {})
            out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=250)
    parser.add_argument("--posts", type=int, default=200)
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    work = Path(tempfile.mkdtemp(prefix="akosha-bench-daemon-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "AKOSHA_SYNC_"))}
    try:
        data = work / "data"
        t0 = time.monotonic()
        grow_to_size(data, args.size_mb * 0.42, args.size_mb * 0.58)
        print(f"generated {args.size_mb:.0f} MB of databases in {time.monotonic() - t0:.1f} s")
        s3 = SeaweedFS(work / "s3", "benchkey", "bench-secret-key-1234", buckets=["bench"])
        s3.start()
        state = work / "state"
        toml = work / "config.toml"
        toml.write_text(
            f'cloud_bucket = "bench"\ncloud_endpoint = "{s3.endpoint}"\n'
            f'access_key_id = "benchkey"\nsecret_access_key = "bench-secret-key-1234"\n'
            f'system_id = "bench"\ndata_dir = "{data}"\nstate_dir = "{state}"\n'
            f'log_file = "{state / "log.jsonl"}"\nexport_memories = false\n'
            f'akosha_url = "http://127.0.0.1:9/mcp"\nupload_timeout_seconds = 3600\n'
        )
        state.mkdir()
        started = time.monotonic()
        proc = subprocess.Popen(
            [EXE, "--config", str(toml), "serve", "--transport", "http", "--port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        )
        try:
            url = _wait_daemon(state, proc, started + 60)
            answered = anyio.run(_first_initialize, url, started + 60)
            start_to_init = answered - started

            hook = {"session_id": "bench", "hook_event_name": "SessionEnd", "reason": "other",
                    "cwd": "/tmp", "transcript_path": "/tmp/t.jsonl"}
            latencies: list[float] = []
            during: list[bool] = []
            with httpx.Client(base_url=url, timeout=10) as http:
                http.post("/hooks/session-end", json=hook)  # starts the big sync
                while not http.get("/health").json()["running"]:
                    time.sleep(0.01)
                for _ in range(args.posts):
                    t = time.perf_counter()
                    response = http.post("/hooks/session-end", json=hook)
                    latencies.append(time.perf_counter() - t)
                    assert response.status_code == 202
                    during.append(http.get("/health").json()["running"])
                while http.get("/health").json()["running"] or http.get(
                    "/health").json()["queued"]:
                    time.sleep(0.05)
            status = anyio.run(_status_latency, url, 50)
            # The hook command as Claude Code runs it: forwards to this daemon.
            hook_cmd: list[float] = []
            for _ in range(5):
                t = time.perf_counter()
                subprocess.run(
                    [EXE, "--config", str(toml), "hook", "session-end"],
                    input=json.dumps(hook), text=True, env=env, capture_output=True, check=True,
                )
                hook_cmd.append(time.perf_counter() - t)
        finally:
            proc.terminate()
            proc.wait(30)

        s3.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ms = 1000
    results: dict[str, Any] = {
        "hook_posts": len(latencies),
        "hook_posts_during_sync": sum(during),
        "hook_median_ms": round(statistics.median(latencies) * ms, 2),
        "hook_p99_ms": round(_pct(latencies, 0.99) * ms, 2),
        "start_to_first_initialize_s": round(start_to_init, 3),
        "status_median_ms": round(statistics.median(status) * ms, 2),
        "status_p99_ms": round(_pct(status, 0.99) * ms, 2),
        "hook_command_median_s": round(statistics.median(hook_cmd), 3),
    }
    for key, value in results.items():
        print(f"{key:32} {value}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "daemon.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
