"""Process plumbing shared by the real servers the tests start (Akosha, SeaweedFS).

A server runs as one child process in a session of its own, with stdout and
stderr appended to a log file. It gets SIGTERM if the test process dies (Linux),
and any still running at interpreter exit is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar, Self

__all__ = [
    "HOST",
    "LOG_TAIL_LINES",
    "POLL_INTERVAL_S",
    "ServerProcess",
    "http_get",
    "parent_death_preexec",
    "pick_free_port",
]

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 40


def parent_death_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM if the test process dies.

    None off Linux or where ``prctl`` cannot be found.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def _preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return _preexec


def pick_free_port(host: str = HOST) -> int:
    """A port the kernel just handed out on ``host`` (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float) -> tuple[int, bytes]:
    """``GET url``: the status and body, error statuses included.

    Raises ``OSError`` when nothing answers HTTP (e.g. connection refused).
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


_PREEXEC = parent_death_preexec()
_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.kill()


class ServerProcess:
    """Base of a test server run as one child process logging to ``log_path``.

    Subclasses implement :meth:`start` (which calls :meth:`_launch`) and
    :meth:`_wait_ready`; this class stops, kills, restarts and reaps the child
    and makes the server a context manager.
    """

    #: On SIGKILL, kill the child's whole process group (it leads its own session).
    _kill_process_group: ClassVar[bool] = False
    #: What :meth:`log_tail` answers when there is no log file.
    _no_log_text: ClassVar[str] = "(no log)"

    def __init__(self, log_path: Path, *, startup_timeout: float, stop_timeout: float) -> None:
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        #: How long the last successful ``start()`` took, in seconds.
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The child's pid, or None when none has been started or it was reaped."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        """True while the child process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        """Launch the server and block until it is ready."""
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (graceful shutdown) and wait; SIGKILL if it does not exit in time.

        ``timeout`` defaults to ``stop_timeout``.
        """
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self._sigkill(proc)
        self._reap()

    def kill(self) -> None:
        """SIGKILL and wait: simulates a crash (no graceful shutdown)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            self._sigkill(proc)
        self._reap()

    def restart(self) -> Self:
        """Stop if running, then start again on the same ports and workdir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and release resources; safe to call more than once."""
        self.stop()

    def __enter__(self) -> Self:
        """``start()`` the server; ``__exit__`` closes it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # Last resort only; fixtures call close().
        with contextlib.suppress(Exception):
            if self.is_running():
                self.kill()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self._no_log_text
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------- for subclasses
    def _wait_ready(self, deadline: float) -> None:
        """Return once the child serves; raise if it exits or ``deadline`` passes."""
        raise NotImplementedError

    def _launch(
        self, args: Sequence[str], *, cwd: Path, env: dict[str, str], header: str, began: float
    ) -> None:
        """Run ``args`` with ``header`` appended to the log first, then wait until ready.

        The child is killed if waiting fails; ``startup_seconds`` counts from ``began``.
        """
        self._log = self.log_path.open("ab")
        self._log.write(header.encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches pytest, whose teardown stops us
            preexec_fn=_PREEXEC,  # only a prctl() call
        )
        _LIVE.add(self)
        try:
            self._wait_ready(began + self.startup_timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_seconds = time.monotonic() - began

    def _polls(
        self,
        deadline: float,
        *,
        exited: Callable[[int | None], BaseException],
        timed_out: Callable[[], BaseException],
    ) -> Iterator[None]:
        """Yield every ``POLL_INTERVAL_S`` while the child runs.

        Raises ``exited(returncode)`` once the child has exited (it is reaped
        first) and ``timed_out()`` once ``deadline`` has passed.
        """
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                self._reap()
                raise exited(code)
            yield
            if time.monotonic() >= deadline:
                raise timed_out()
            time.sleep(POLL_INTERVAL_S)

    def _after_exit(self) -> None:
        """Called once the child has exited and been forgotten; a hook for cleanup."""

    def _sigkill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the child (or its process group, see ``_kill_process_group``) and wait."""
        if self._kill_process_group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        else:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()

    def _reap(self) -> None:
        """Forget a child that has exited and close the log once no child runs."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
            _LIVE.discard(self)
            self._after_exit()
        if self._proc is None and self._log is not None:
            self._log.close()
            self._log = None


def hold_open_in_duckdb(path: Path) -> subprocess.Popen[str]:
    """Another process with ``path`` open in DuckDB (so holding DuckDB's lock), once it
    has written a table ``mine`` (one row, 42). :func:`let_go` ends it."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import duckdb, sys\n"
         f"con = duckdb.connect({str(path)!r})\n"
         "con.execute('CREATE TABLE IF NOT EXISTS mine AS SELECT 42 AS x')\n"
         "print('open', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
    return proc


def let_go(proc: subprocess.Popen[str]) -> None:
    """End a :func:`hold_open_in_duckdb` process: it closes its database and exits."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
