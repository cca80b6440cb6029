"""The command line as a shell pipeline sees it."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.logs import configure_logging
from support.configfile import write_toml
from support.logs import drop_our_log_handlers

_EXE = str(Path(sys.executable).with_name("akosha-sync"))
MakeConfig = Callable[..., AkoshaSyncConfig]


def test_a_sync_names_what_it_stored_and_counts_the_packs(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, tmp_path: Path
) -> None:
    """The human summary of a cold sync: "sent: 3 packs, index.json, manifest.json", not
    every pack's 64-hex name on one line."""
    config = s3_config(export_memories=False)
    out = subprocess.run(
        [_EXE, "--config", str(write_toml(config, tmp_path / "c.toml")), "sync"],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    packs = [o.object_name for o in minio_client.list_objects(
        s3_bucket, prefix=f"systems/{config.system_id}/packs/", recursive=True)]
    assert packs
    sent = next(line for line in out.stdout.splitlines() if line.strip().startswith("sent:"))
    expected = f"{len(packs)} pack{'s' if len(packs) != 1 else ''}, index.json, manifest.json ("
    assert expected in sent, sent
    assert not re.search(r"[0-9a-f]{64}", sent), sent


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


def test_the_log_file_keeps_our_events_and_not_asyncios_chatter(tmp_path: Path) -> None:
    """Every command runs an event loop; asyncio's debug line for it is not an event."""
    log = tmp_path / "akosha-sync.log"
    config = AkoshaSyncConfig(state_dir=str(tmp_path / "state"), log_file=str(log))
    configure_logging(config, stderr_level=None)
    try:
        anyio.run(anyio.sleep, 0)
        logging.getLogger("akosha_sync.test").info("an event of ours")
        logging.getLogger("asyncio").error("a real asyncio error")
    finally:
        drop_our_log_handlers()
    text = log.read_text()
    assert "an event of ours" in text and "a real asyncio error" in text
    assert "Using selector" not in text, text


def test_a_refused_signature_is_reported_as_credentials_and_not_retried(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    """A wrong secret on a read command (a list request) is the user's to fix now, not
    network trouble to retry and wait out."""
    config = s3_config(secret_access_key="not-the-secret-0123456789abcdef", max_retries=3,
                       retry_backoff_seconds=5.0)
    for command in (["snapshots"], ["restore", "--to", str(tmp_path / "r")]):
        out = subprocess.run(
            [_EXE, "--config", str(write_toml(config, tmp_path / "c.toml")), *command],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
        )
        assert out.returncode == 1, out.stderr
        assert "the credentials were refused" in out.stderr, out.stderr
        assert "retrying" not in out.stderr, out.stderr
        assert "not-the-secret" not in out.stdout + out.stderr


def test_a_failed_sync_states_its_error_once_on_stderr(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    """The summary on stdout, the error on stderr, once (it was printed three times)."""
    import socket

    with socket.socket() as closed:  # a free port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = s3_config(cloud_endpoint=f"http://127.0.0.1:{port}", force_method="cloud",
                       max_retries=0)
    out = subprocess.run(
        [_EXE, "--config", str(write_toml(config, tmp_path / "c.toml")), "sync"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stdout.startswith("  [FAILED] cloud sync in "), out.stdout  # not "hybrid"
    # stdout: what each method met; stderr: the error. No third copy.
    assert "\n    error:" not in out.stdout, out.stdout
    assert out.stdout.count("could not connect") == 1, out.stdout
    assert out.stderr.count("could not connect") == 1, out.stderr
    assert out.stderr.startswith("akosha-sync: sync failed: "), out.stderr


def test_version() -> None:
    from akosha_sync import __version__

    out = subprocess.run([_EXE, "--version"], capture_output=True, text=True, timeout=30,
                         check=True)
    assert out.stdout == f"akosha-sync {__version__}\n"


def test_https_to_a_plain_http_store_says_to_write_http(
    s3_config: MakeConfig, tmp_path: Path
) -> None:
    plain = s3_config()
    config = s3_config(cloud_endpoint=plain.cloud_endpoint.replace("http://", "https://"),
                       force_method="cloud", max_retries=0)
    out = subprocess.run(
        [_EXE, "--config", str(write_toml(config, tmp_path / "c.toml")), "sync"],
        capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
    )
    assert out.returncode == 1
    assert "cloud_endpoint must start with http://" in out.stderr, out.stderr


def test_the_readme_s_first_command_runs_the_demo_end_to_end(tmp_path: Path) -> None:
    """``make demo`` (= ``akosha-sync demo``): three syncs to a file:// store, then the
    newest upload restored and compared with the sources; a second run works too."""
    import hashlib

    for run in ("first", "again"):
        out = subprocess.run(
            [_EXE, "demo", "--dir", str(tmp_path / "demo")], capture_output=True, text=True,
            timeout=180, check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")},
        )
        assert out.returncode == 0, (run, out.stdout[-2000:], out.stderr[-2000:])
        assert out.stdout.count("  [ok] cloud sync ") == 3, out.stdout
        assert "byte for byte the same as" in out.stdout and ": yes" in out.stdout
    data, restored = tmp_path / "demo" / "claude-data", tmp_path / "demo" / "restored"
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()
              if p.is_file()}
    assert digest and digest == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in restored.iterdir()}
    assert not (tmp_path / "home").exists()  # everything stays in the demo's folder


def test_the_process_ends_even_when_a_worker_thread_is_left_waiting() -> None:
    """After an interrupt, AnyIO's idle worker threads (not daemons) could be left
    blocked on their queue; the interpreter's exit then waited for them forever."""
    left_behind = (
        "import queue, threading\n"
        "from akosha_sync import cli\n"
        "threading.Thread(target=queue.Queue().get, name='AnyIO worker thread').start()\n"
        "cli.main = lambda: 7\n"
        "cli.run()\n"
    )
    out = subprocess.run([sys.executable, "-c", left_behind], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 7, out.stderr


def test_a_log_file_that_cannot_be_written_is_said_once_and_the_sync_goes_on(
    tmp_path: Path,
) -> None:
    from akosha_sync.sample import create_sample_databases

    create_sample_databases(tmp_path / "data")
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'cloud_bucket = "bucket"\ncloud_endpoint = "file://{tmp_path / "store"}"\n'
        f'data_dir = "{tmp_path / "data"}"\nstate_dir = "{tmp_path / "state"}"\n'
        'log_file = "/proc/no-such-folder/akosha-sync.log"\nsystem_id = "logless"\n'
        'force_method = "cloud"\n'
    )
    out = subprocess.run([_EXE, "--config", str(toml), "sync"], capture_output=True,
                         text=True, timeout=120, check=False,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stderr.count("cannot write the log file /proc/no-such-folder/") == 1, out.stderr
    assert "{'" not in out.stderr + out.stdout  # no raw event dicts from logging's last resort
