"""What the fault scenarios share (tests/test_faults.py and bench/faults.py).

* :class:`DaemonProcess`: a real ``akosha-sync serve --transport http --port 0``
  process, its /health, its hook route and its MCP tools over streamable HTTP;
* :func:`write_toml`: a configuration as the TOML file a process reads;
* :func:`restore_problems`: every manifest in a bucket restored as a user would
  (download each object it names, undo zstd, check both SHA-256), with minio;
* :func:`incomplete_uploads`: the bucket's unfinished multipart uploads, with minio;
* :func:`until`: poll a condition with a deadline (never a sleep as synchronisation).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import httpx
from minio import Minio

from .configfile import write_toml
from .verify import get_object, manifests
from .wait import until

__all__ = [
    "EXE",
    "DaemonProcess",
    "incomplete_uploads",
    "objects",
    "restore_problems",
    "session_end",
    "until",
    "write_toml",
]

EXE = str(Path(sys.executable).with_name("akosha-sync"))


def session_end(session: str = "s-1") -> dict[str, str]:
    """A Claude Code SessionEnd hook body."""
    return {"session_id": session, "transcript_path": "/tmp/t.jsonl", "cwd": "/tmp",
            "hook_event_name": "SessionEnd", "reason": "prompt_input_exit"}


def objects(client: Minio, bucket: str) -> list[str]:
    """Every key in the bucket."""
    return sorted(o.object_name for o in client.list_objects(bucket, recursive=True)
                  if o.object_name is not None)


def claims_without_manifest(client: Minio, bucket: str) -> list[str]:
    """Claims with no manifest beside them: uploads in flight, as prune counts them."""
    keys = objects(client, bucket)
    return [k for k in keys if k.endswith("/_claim.json")
            and k.removesuffix("_claim.json") + "manifest.json" not in keys]


def incomplete_uploads(client: Minio, bucket: str) -> list[str]:
    """Keys of multipart uploads started and neither completed nor aborted."""
    result = client._list_multipart_uploads(bucket, prefix="systems/")
    return sorted(u.object_name for u in result.uploads if u.object_name)


def restore_problems(client: Minio, bucket: str) -> list[str]:
    """Restore every manifest's files from what minio reads (empty: all restore).

    Both layouts: whole objects (``files``), or every piece of the upload's index.json
    fetched from its pack by range (``blocks``); each piece and each whole file is
    checked against its SHA-256, independently of the code under test."""
    problems: list[str] = []
    for key in manifests(client, bucket):
        manifest = json.loads(get_object(client, bucket, key))
        if manifest.get("storage_layout") == "blocks":
            problems += _blocks_problems(client, bucket, key, manifest)
            continue
        for name, entry in manifest["file_details"].items():
            try:
                stored = get_object(client, bucket, entry["key"])
            except Exception as exc:  # a missing object is the finding, not a crash
                problems.append(f"{key}: {name} -> {entry['key']} unreadable: {exc}")
                continue
            if hashlib.sha256(stored).hexdigest() != entry["stored_sha256"]:
                problems.append(f"{key}: {name} stored bytes do not match stored_sha256")
                continue
            if hashlib.sha256(_original(stored, entry.get("compression"))).hexdigest() != (
                entry["sha256"]
            ):
                problems.append(f"{key}: {name} restored bytes do not match sha256")
    return problems


def _original(stored: bytes, compression: str | None) -> bytes:
    import zstandard

    if compression == "zstd":
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(stored))
    return stored


def _blocks_problems(
    client: Minio, bucket: str, key: str, manifest: dict[str, Any]
) -> list[str]:
    problems: list[str] = []
    try:
        index = json.loads(get_object(client, bucket, manifest["index"]))
    except Exception as exc:
        return [f"{key}: index {manifest.get('index')} unreadable: {exc}"]
    for name, entry in manifest["file_details"].items():
        listed = index["files"].get(name)
        if listed is None:  # memories.json is a whole object beside the index
            try:
                data = get_object(client, bucket, entry["key"])
            except Exception as exc:
                problems.append(f"{key}: {name} -> {entry['key']} unreadable: {exc}")
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{key}: {name} bytes do not match sha256")
            continue
        whole = hashlib.sha256()
        for piece_sha, pack_id, offset, stored_length, _length, compression in listed["pieces"]:
            pack = index["packs"][pack_id]["key"]
            try:
                response = client.get_object(bucket, pack, offset=offset, length=stored_length)
                try:
                    stored = response.read()
                finally:
                    response.close()
                    response.release_conn()
            except Exception as exc:
                problems.append(f"{key}: {name} -> {pack} unreadable: {exc}")
                break
            raw = _original(stored, "zstd" if compression == "zstd" else None)
            if hashlib.sha256(raw).hexdigest() != piece_sha:
                problems.append(f"{key}: {name} piece {piece_sha[:12]} in {pack} is damaged")
                break
            whole.update(raw)
        else:
            if whole.hexdigest() != entry["sha256"]:
                problems.append(f"{key}: {name} restored bytes do not match sha256")
    return problems


class DaemonProcess:
    """A real ``akosha-sync serve --transport http`` on a free port."""

    def __init__(self, toml: Path, state_dir: Path, *, stderr: Path) -> None:
        self.toml = toml
        self.state_dir = state_dir
        self.stderr_path = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._stderr: IO[bytes] | None = None

    def start(self, *, timeout: float = 30) -> DaemonProcess:
        info = self.state_dir / "daemon.json"
        info.unlink(missing_ok=True)
        self._stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(
            [EXE, "--config", str(self.toml), "serve", "--transport", "http", "--port", "0",
             "--grace", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        proc = self.proc

        def ready() -> str | None:
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited with {proc.returncode}: {self.stderr()}")
            try:
                data = json.loads(info.read_text())
            except (OSError, ValueError):
                return None
            return str(data["url"]) if data.get("pid") == proc.pid else None

        self.url = until(ready, timeout=timeout, what="the daemon to listen")
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def health(self, timeout: float = 2) -> dict[str, Any]:
        return dict(httpx.get(f"{self.url}/health", timeout=timeout).json())

    def hook(self, body: Any = None, *, timeout: float = 5) -> httpx.Response:
        return httpx.post(f"{self.url}/hooks/session-end", json=body or session_end(),
                          timeout=timeout)

    def call_tool(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """One MCP tool call over streamable HTTP; its structured result."""
        import anyio
        from mcp import Client

        async def ask() -> dict[str, Any]:
            async with Client(f"{self.url}/mcp") as client:
                result = await client.call_tool(name, arguments or {})
                assert not result.is_error, result.content
                assert result.structured_content is not None
                return dict(result.structured_content)

        return anyio.run(ask)

    def status(self) -> dict[str, Any]:
        return self.call_tool("akosha_sync_status")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
