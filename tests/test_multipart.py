"""Aborting the incomplete multipart uploads a failed sync left (sync/multipart.py).

The signer is checked against AWS's published Signature Version 4 examples; the
sweep against real SeaweedFS, with incomplete uploads made and read back by the
minio client.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository import multipart
from akosha_sync.repository.manifest import claim_key, make_upload_id, manifest_key, object_key
from akosha_sync.sample import grow_to_size
from akosha_sync.sync.runner import run_sync
from support.faults import incomplete_uploads
from support.proxy import FaultProxy, ProxyRequest

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
S3_EXAMPLE = {"access_key": "AKIAIOSFODNN7EXAMPLE", "region": "us-east-1",
              "secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
              "now": datetime(2013, 5, 24, tzinfo=UTC)}


@pytest.mark.parametrize(
    ("url", "headers", "keys", "signature"),
    [
        # The Signature Version 4 test suite's "get-vanilla".
        ("https://example.amazonaws.com/", {},
         {"access_key": "AKIDEXAMPLE", "secret_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
          "region": "us-east-1", "service": "service",
          "now": datetime(2015, 8, 30, 12, 36, tzinfo=UTC)},
         "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        # The S3 documentation's GET Object example (header-based authentication).
        ("https://examplebucket.s3.amazonaws.com/test.txt",
         {"Range": "bytes=0-9", "x-amz-content-sha256": EMPTY}, S3_EXAMPLE,
         "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
        # Its GET Bucket (list objects) example: a canonical query string.
        ("https://examplebucket.s3.amazonaws.com/?max-keys=2&prefix=J",
         {"x-amz-content-sha256": EMPTY}, S3_EXAMPLE,
         "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"),
    ],
)
def test_signer_matches_the_aws_examples(
    url: str, headers: dict[str, str], keys: dict[str, Any], signature: str
) -> None:
    signed = multipart.sign_request("GET", url, headers, **keys)
    assert signed["authorization"].endswith(f"Signature={signature}")


def test_query_is_decoded_before_it_is_signed() -> None:
    """An encoded query value is signed once-encoded, whatever order it comes in."""
    now = S3_EXAMPLE["now"]
    keys = {k: v for k, v in S3_EXAMPLE.items() if k != "now"}
    a = multipart.sign_request("GET", "https://h/b?uploads=&prefix=a%2Fb", {}, now=now, **keys)
    b = multipart.sign_request("GET", "https://h/b?prefix=a/b&uploads", {}, now=now, **keys)
    assert a["authorization"] == b["authorization"]
    token = multipart.sign_request("GET", "https://h/b", {}, now=now, session_token="tok", **keys)
    assert token["x-amz-security-token"] == "tok"
    assert "x-amz-security-token" in token["authorization"]


def _is_part(request: ProxyRequest) -> bool:
    return request.method == "PUT" and "partNumber=" in request.query


def _start(client: Minio, bucket: str, key: str) -> str:
    return str(client._create_multipart_upload(bucket, key, {}))


def _put(client: Minio, bucket: str, key: str) -> None:
    client.put_object(bucket, key, io.BytesIO(b"{}"), 2)


def test_sweep_aborts_only_what_no_live_sync_can_own(
    s3_config: Callable[..., AkoshaSyncConfig], minio_client: Minio, s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = s3_config(system_id="me")
    sid = config.system_id_resolved
    now = datetime.now(UTC)
    old, abandoned, unclaimed, committed, live, current = (
        make_upload_id(sid, now - timedelta(minutes=m)) for m in (50, 40, 30, 20, 10, 0)
    )
    keep = {
        # another system's: never ours to touch
        object_key("reflection.duckdb", make_upload_id("other", now), "other"),
        object_key("reflection.duckdb", committed, sid),  # its upload has a manifest
        object_key("reflection.duckdb", live, sid),  # claimed, young: a live sync's
        object_key("reflection.duckdb", old, sid),  # claimed, young by the store's clock
    }
    gone = {
        object_key("reflection.duckdb", abandoned, sid),  # a failed sync of ours
        object_key("knowledge_graph.duckdb", unclaimed, sid),  # its sync ended
    }
    for key in keep | gone:
        _start(minio_client, s3_bucket, key)
    for upload in (old, abandoned, committed, live):
        _put(minio_client, s3_bucket, claim_key(sid, upload))
    _put(minio_client, s3_bucket, manifest_key(sid, committed))

    # The store could not be reached when `abandoned` failed: it is remembered.
    unreachable = s3_config(system_id="me", cloud_endpoint="http://127.0.0.1:9")
    assert anyio.run(multipart.abort_upload, unreachable, abandoned) == 0
    assert sorted(incomplete_uploads(minio_client, s3_bucket)) == sorted(keep | gone)

    assert anyio.run(multipart.sweep, config, current) == 2
    assert sorted(incomplete_uploads(minio_client, s3_bucket)) == sorted(keep)
    assert multipart._abandoned(config) == []  # settled

    # Initiated longer ago than any sync may last (by the store's clock): aborted even
    # though claimed. A margin of -60 s puts a 30 s budget's limit before "now".
    monkeypatch.setattr(multipart, "_AGE_MARGIN", timedelta(seconds=-60))
    short = s3_config(system_id="me", upload_timeout_seconds=30)
    # A sweep that found all settled is not repeated within SWEEP_INTERVAL (nothing new
    # was remembered): the next sync does not even ask the store.
    assert anyio.run(multipart.sweep, short, current) == 0
    assert len(incomplete_uploads(minio_client, s3_bucket)) == len(keep)
    monkeypatch.setattr(multipart, "SWEEP_INTERVAL", timedelta(0))
    assert anyio.run(multipart.sweep, short, current) == 2
    assert sorted(incomplete_uploads(minio_client, s3_bucket)) == sorted(
        keep - {object_key("reflection.duckdb", u, sid) for u in (old, live)}
    )


def test_abort_upload_aborts_that_upload_only(
    s3_config: Callable[..., AkoshaSyncConfig], minio_client: Minio, s3_bucket: str,
) -> None:
    config = s3_config(system_id="me")
    now = datetime.now(UTC)
    mine, other = make_upload_id("me", now), make_upload_id("me", now, 1)
    _start(minio_client, s3_bucket, object_key("a.duckdb", mine, "me"))
    _start(minio_client, s3_bucket, object_key("b.duckdb", mine, "me"))
    _start(minio_client, s3_bucket, object_key("a.duckdb", other, "me"))
    assert anyio.run(multipart.abort_upload, config, mine) == 2
    assert incomplete_uploads(minio_client, s3_bucket) == [object_key("a.duckdb", other, "me")]
    assert [u.key for u in anyio.run(multipart.list_incomplete, config)] == [
        object_key("a.duckdb", other, "me")
    ]


def test_file_targets_are_a_no_op(make_config: Callable[..., AkoshaSyncConfig],
                                  tmp_path: Any) -> None:
    config = make_config(cloud_endpoint=f"file://{tmp_path}", cloud_bucket="b")
    assert anyio.run(multipart.sweep, config, "x") == 0
    assert anyio.run(multipart.abort_upload, config, "x") == 0


@pytest.mark.parametrize(("endpoint", "proxy", "tls"), [
    ("https://r2.example.com", "", True),
    ("", "", True),  # AWS
    ("http://127.0.0.1:9000", "", False),
    ("http://minio.lan:9000", "http://proxy.lan:3128", False),
    ("http://minio.lan:9000", "https://proxy.lan:3128", True),  # TLS to the proxy
])
def test_certificates_are_loaded_only_where_tls_can_be_met(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, proxy: str, tls: bool
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    assert multipart._uses_tls(endpoint) is tls


def test_listing_is_read_with_or_without_the_s3_namespace() -> None:
    body = ("<ListMultipartUploadsResult{ns}><Upload><Key>k</Key><UploadId>u</UploadId>"
            "<Initiated>2026-01-02T03:04:05.678Z</Initiated></Upload>"
            "<IsTruncated>false</IsTruncated></ListMultipartUploadsResult>")
    for ns in ("", ' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'):
        root = multipart._parse_xml(body.format(ns=ns).encode())
        assert [u.findtext("Key") for u in root.iter("Upload")] == ["k"]
    with pytest.raises(multipart._S3Error, match="DTD"):
        multipart._parse_xml(b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>')


def test_a_sync_cancelled_mid_upload_aborts_its_multipart_upload(
    s3_config: Callable[..., AkoshaSyncConfig], seaweedfs: Any, minio_client: Minio,
    s3_bucket: str, tmp_path: Path,
) -> None:
    """obstore does not abort a multipart upload whose call is cancelled: we do, at once."""
    data = tmp_path / "big"
    grow_to_size(data, 12, 1, seed=7)  # two 5 MiB parts
    with FaultProxy.to(seaweedfs.endpoint) as proxy:
        config = s3_config(cloud_endpoint=proxy.endpoint, data_dir=str(data),
                           export_memories=False, chunk_size_mb=5,
                           storage_layout="files")  # blocks packs are single PUTs
        proxy.delay(0.2)  # the upload then lasts long enough to be cancelled in it

        async def cancel_mid_upload() -> None:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(partial(run_sync, config, method="cloud"))
                    await anyio.to_thread.run_sync(
                        partial(proxy.wait_for, _is_part, timeout=60, what="a part upload"))
                    tg.cancel_scope.cancel()

        anyio.run(cancel_mid_upload)
    assert incomplete_uploads(minio_client, s3_bucket) == []
    assert multipart._abandoned(config) == []
