"""The fault proxy itself, against the real SeaweedFS: each fault does what it says."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import urllib3
from minio import Minio
from minio.error import S3Error

from support.proxy import FaultProxy
from support.seaweedfs import REGION, SeaweedFS
from support.verify import get_object


@pytest.fixture
def proxy(seaweedfs: SeaweedFS) -> Iterator[FaultProxy]:
    with FaultProxy.to(seaweedfs.endpoint) as running:
        yield running


def _client(proxy: FaultProxy, seaweedfs: SeaweedFS, *, read_timeout: float = 10) -> Minio:
    """A minio client that talks through the proxy and never retries."""
    return Minio(
        f"127.0.0.1:{proxy.port}",
        access_key=seaweedfs.access_key,
        secret_key=seaweedfs.secret_key,
        secure=False,
        region=REGION,
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2.0, read=read_timeout), retries=False
        ),
    )


def _put(client: Minio, bucket: str, key: str, data: bytes) -> Any:
    return client.put_object(bucket, key, io.BytesIO(data), len(data))


def test_forwards_and_counts_by_method(
    proxy: FaultProxy, seaweedfs: SeaweedFS, s3_bucket: str, minio_client: Minio
) -> None:
    client = _client(proxy, seaweedfs)
    _put(client, s3_bucket, "a.bin", b"x" * 300_000)
    assert get_object(client, s3_bucket, "a.bin") == b"x" * 300_000
    client.stat_object(s3_bucket, "a.bin")
    client.remove_object(s3_bucket, "a.bin")
    assert proxy.counts["PUT"] == 1 and proxy.counts["GET"] == 1
    assert proxy.counts["HEAD"] == 1 and proxy.counts["DELETE"] == 1
    assert proxy.writes() == 2
    assert all(e.status is not None and e.finished for e in proxy.exchanges)
    assert list(minio_client.list_objects(s3_bucket)) == []


def test_chunked_request_bodies_are_relayed(proxy: FaultProxy) -> None:
    def body() -> Iterator[bytes]:
        yield b"a" * 1000
        yield b"b" * 70_000

    answer = httpx.put(f"{proxy.endpoint}/nobucket/k", content=body(), timeout=10)
    assert answer.status_code in (400, 403, 404, 411)  # unsigned: refused, but it got there
    assert proxy.counts["PUT"] == 1


def test_drop_response_after_the_server_committed(
    proxy: FaultProxy, seaweedfs: SeaweedFS, s3_bucket: str, minio_client: Minio
) -> None:
    client = _client(proxy, seaweedfs)
    proxy.drop_response(lambda r: r.method == "PUT" and r.path.endswith("/manifest.json"))
    _put(client, s3_bucket, "data.bin", b"d")  # not matching: answered
    with pytest.raises(urllib3.exceptions.HTTPError):
        _put(client, s3_bucket, "u/manifest.json", b"{}")
    # The server has it, although the client never heard so.
    assert get_object(minio_client, s3_bucket, "u/manifest.json") == b"{}"
    dropped = [e for e in proxy.exchanges if e.dropped]
    assert len(dropped) == 1 and dropped[0].status == 200
    _put(client, s3_bucket, "u2/manifest.json", b"{}")  # one shot only


def test_stall_mid_transfer_then_resume(
    proxy: FaultProxy, seaweedfs: SeaweedFS, s3_bucket: str, minio_client: Minio
) -> None:
    client = _client(proxy, seaweedfs, read_timeout=1.0)
    proxy.stall(lambda r: r.method == "PUT", after_bytes=100_000)
    failed: list[BaseException] = []

    def upload() -> None:
        try:
            _put(client, s3_bucket, "big.bin", b"z" * 1_000_000)
        except BaseException as exc:  # reported to the test thread
            failed.append(exc)

    worker = threading.Thread(target=upload)
    worker.start()
    worker.join(15)
    assert not worker.is_alive() and failed, "the stalled upload should time out"
    assert proxy.stalled
    with pytest.raises(S3Error):
        minio_client.stat_object(s3_bucket, "big.bin")  # never completed upstream
    proxy.resume()
    _put(_client(proxy, seaweedfs), s3_bucket, "after.bin", b"ok")
    assert get_object(minio_client, s3_bucket, "after.bin") == b"ok"


def test_stall_everything_at_once(proxy: FaultProxy) -> None:
    proxy.stall()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{proxy.endpoint}/", timeout=httpx.Timeout(0.5))
    proxy.forward()
    assert httpx.get(f"{proxy.endpoint}/", timeout=5).status_code == 403


def test_refuse_then_accept_on_the_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    proxy.accept()
    assert proxy.port == port
    assert httpx.get(f"{proxy.endpoint}/", timeout=5).status_code == 403


def test_dead_upstream_resets_the_client(seaweedfs: SeaweedFS) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
        dead = holder.getsockname()[1]
        with FaultProxy("127.0.0.1", dead) as proxy, pytest.raises(httpx.TransportError):
            httpx.get(f"{proxy.endpoint}/", timeout=5)


def test_delay_holds_each_request(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    began = time.monotonic()
    assert httpx.get(f"{proxy.endpoint}/", timeout=5).status_code == 403
    assert time.monotonic() - began >= 0.3
    proxy.forward()
    began = time.monotonic()
    httpx.get(f"{proxy.endpoint}/", timeout=5)
    assert time.monotonic() - began < 0.3
