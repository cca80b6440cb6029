"""The command line as a shell pipeline sees it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_EXE = str(Path(sys.executable).with_name("akosha-sync"))


def test_a_reader_that_leaves_early_gets_a_quiet_exit(tmp_path: Path) -> None:
    """``akosha-sync status | head -1``: no traceback when the reader closes the pipe,
    and the shell's SIGPIPE status, as other command-line tools give."""
    toml = tmp_path / "config.toml"
    toml.write_text(
        f'data_dir = "{tmp_path / "data"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'log_file = "{tmp_path / "state" / "akosha-sync.log"}"\n'
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run(
            [_EXE, "--config", str(toml), "status"], stdout=write_end,
            stderr=subprocess.PIPE, text=True, timeout=60, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
        )
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr
    assert proc.returncode == 141, proc.stderr
