#!/usr/bin/env python
"""Where a cold sync's time goes: phases from the ``progress`` callback, one sync in-process.

    .venv/bin/python bench/phases.py [--size 250] [--data DIR] [--no-export] [--layout blocks]

Generates the bench's dataset (or uses ``--data``), starts a SeaweedFS, runs one cold
sync with a fresh system id and prints, per phase, when it was first reported and
how long it lasted until the next phase began, plus the process's peak RSS (VmHWM).
A profiling aid, not a benchmark: bench_cloud.py gives the figures.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=float, default=250.0)
    parser.add_argument("--data", type=Path, default=None, help="use this data folder")
    parser.add_argument("--no-export", dest="export", action="store_false")
    parser.add_argument("--layout", choices=["blocks", "files"], default="blocks")
    args = parser.parse_args()

    import anyio

    from akosha_sync.config import AkoshaSyncConfig
    from akosha_sync.sync.cloud import CloudSyncMethod
    from bench_cloud import ACCESS_KEY, BUCKET, SECRET_KEY, child_generate
    from support.seaweedfs import SeaweedFS

    work = Path(tempfile.mkdtemp(prefix="akosha-phases-"))
    data = args.data or work / "data"
    if args.data is None:
        child_generate(data, args.size)
    server = SeaweedFS(work / "seaweedfs", ACCESS_KEY, SECRET_KEY, [BUCKET]).start()
    try:
        config = AkoshaSyncConfig(
            cloud_bucket=BUCKET, cloud_endpoint=server.endpoint, access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY, system_id="phases", data_dir=str(data),
            state_dir=str(work / "state"), log_file=str(work / "state" / "log"),
            export_memories=args.export, storage_layout=args.layout,
            upload_timeout_seconds=3600,
        )
        first: dict[str, float] = {}
        began = time.perf_counter()

        def progress(phase: str, done: int, total: int) -> None:
            first.setdefault(phase, time.perf_counter() - began)

        result = anyio.run(functools.partial(CloudSyncMethod(config).sync, progress=progress))
        end = time.perf_counter() - began
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)
    order = sorted(first.items(), key=lambda item: item[1])
    for i, (phase, start) in enumerate(order):
        until = order[i + 1][1] if i + 1 < len(order) else end
        print(f"{phase:32s} from {start:6.2f} s  for {until - start:6.2f} s")
    status = Path("/proc/self/status").read_text()
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    print(f"total {end:.2f} s, sent {result['bytes_transferred'] / 2**20:.1f} MiB, "
          f"peak RSS {int(hwm.group(1)) / 1024 if hwm else 0:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
