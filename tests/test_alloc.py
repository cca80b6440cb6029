"""The allocator tuning (akosha_sync._alloc): what it does on glibc, which commands
apply it, and never over the user's own setting."""

from __future__ import annotations

import json
import platform
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from akosha_sync import cli
from akosha_sync._alloc import tune_allocator
from akosha_sync.config import AkoshaSyncConfig
from support.configfile import write_toml

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Eight 8 MiB buffers, each followed by a small block that stays: once they are freed,
# what the process still holds is what the allocator kept of them (MB).
_KEPT_AFTER_FREE = """
import re, sys
from pathlib import Path
if sys.argv[1] == "tuned":
    from akosha_sync._alloc import tune_allocator
    assert tune_allocator()
def rss():
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\\s+(\\d+)", text).group(1)) / 1024
first = bytearray(8 << 20); first[::4096] = b"x" * len(first[::4096]); del first
big, small = [], []
for _ in range(8):
    buf = bytearray(8 << 20)
    buf[::4096] = b"x" * len(buf[::4096])  # touch every page
    big.append(buf)
    small.append(bytearray(100_000))
before = rss()
del big
print(round(before - rss()))
"""


def _returned_mb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _KEPT_AFTER_FREE, mode],
                          capture_output=True, text=True, timeout=60, check=True)
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_freed_packs_leave_memory_only_with_the_fixed_threshold() -> None:
    # glibc's own threshold rises to 8 MiB at the first free: the next buffers come
    # from the heap, between blocks that stay, and their pages stay resident.
    assert _returned_mb("default") < 16
    assert _returned_mb("tuned") > 40  # of 64 MB (56 measured; 0 untuned)


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_the_mmap_threshold_is_fixed_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert tune_allocator() is True


@pytest.mark.parametrize(
    ("name", "value"),
    [("MALLOC_MMAP_THRESHOLD_", "65536"),
     ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")],
)
def test_a_threshold_the_user_set_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert tune_allocator() is False


def test_sync_tunes_the_allocator_and_restore_does_not(
    make_config: Callable[..., AkoshaSyncConfig], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI's own entry, against a real file:// repository."""
    config = make_config(cloud_endpoint=f"file://{tmp_path / 'store'}", cloud_bucket="bucket",
                         force_method="cloud")
    toml = write_toml(config, tmp_path / "config.toml")
    tuned: list[str] = []
    monkeypatch.setattr(cli, "tune_allocator", lambda: tuned.append("tuned") or True)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert cli.main(["--config", str(toml), "sync", "--json"]) == 0
        upload = json.loads(capsys.readouterr().out)["upload_id"]
        assert tuned == ["tuned"]
        assert cli.main(["--config", str(toml), "restore", upload, "--to",
                         str(tmp_path / "restored"), "--json"]) == 0
        assert tuned == ["tuned"]
    finally:
        signal.signal(signal.SIGTERM, handler)
