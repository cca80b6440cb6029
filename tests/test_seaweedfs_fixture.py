"""The S3 test server itself: real SigV4, persistence, and the obstore behaviour we rely on."""

from __future__ import annotations

import io
import os

import obstore
import pytest
from minio import Minio
from minio.error import S3Error
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store

from support.s3_fixtures import PRIVATE_BUCKET, S3Credentials
from support.seaweedfs import SeaweedFS


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """obstore reads AWS_* when a store is built: make sure none steer it."""
    for key in list(os.environ):
        if key.upper().startswith("AWS_"):
            monkeypatch.delenv(key)


def make_store(server: SeaweedFS, bucket: str, creds: S3Credentials) -> S3Store:
    return S3Store(
        bucket,
        endpoint=server.endpoint,
        access_key_id=creds.access_key,
        secret_access_key=creds.secret_key,
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def test_put_and_get_with_minio(minio_client: Minio, s3_bucket: str) -> None:
    minio_client.put_object(s3_bucket, "dir/hello.txt", io.BytesIO(b"hello"), 5)

    response = minio_client.get_object(s3_bucket, "dir/hello.txt")
    try:
        assert response.read() == b"hello"
    finally:
        response.close()
        response.release_conn()
    names = [obj.object_name for obj in minio_client.list_objects(s3_bucket, recursive=True)]
    assert names == ["dir/hello.txt"]


def test_s3_bucket_is_fresh_and_unique(minio_client: Minio, s3_bucket: str) -> None:
    assert s3_bucket.startswith("s3-bucket-is-fresh-and-unique-")
    assert minio_client.bucket_exists(s3_bucket)
    assert list(minio_client.list_objects(s3_bucket)) == []


def test_wrong_secret_key_is_refused(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    wrong = seaweedfs.minio_client(secret_key=seaweedfs.secret_key + "x", retries=False)

    with pytest.raises(S3Error) as put_error:
        wrong.put_object(s3_bucket, "k", io.BytesIO(b"x"), 1)
    with pytest.raises(S3Error) as list_error:
        list(wrong.list_objects(s3_bucket))

    assert put_error.value.code == "SignatureDoesNotMatch"
    assert list_error.value.code == "SignatureDoesNotMatch"
    assert list(seaweedfs.minio_client().list_objects(s3_bucket)) == []


def test_unknown_access_key_is_refused(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    stranger = seaweedfs.minio_client(access_key="AKNOBODY", retries=False)

    with pytest.raises(S3Error) as error:
        stranger.put_object(s3_bucket, "k", io.BytesIO(b"x"), 1)

    assert error.value.code == "InvalidAccessKeyId"


def test_anonymous_access_is_refused(
    seaweedfs: SeaweedFS, minio_client: Minio, s3_bucket: str
) -> None:
    minio_client.put_object(s3_bucket, "secret.txt", io.BytesIO(b"s"), 1)
    anonymous = seaweedfs.minio_client(anonymous=True, retries=False)

    for attempt in (
        lambda: anonymous.put_object(s3_bucket, "k", io.BytesIO(b"x"), 1),
        lambda: anonymous.get_object(s3_bucket, "secret.txt"),
        lambda: list(anonymous.list_objects(s3_bucket)),
        lambda: anonymous.list_buckets(),
    ):
        with pytest.raises(S3Error) as error:
            attempt()
        assert error.value.code == "AccessDenied"


def test_missing_bucket_is_no_such_bucket(minio_client: Minio) -> None:
    with pytest.raises(S3Error) as error:
        minio_client.put_object("no-such-bucket-here", "k", io.BytesIO(b"x"), 1)

    assert error.value.code == "NoSuchBucket"  # no auto-creation


def test_data_survives_stop_and_kill(private_seaweedfs: SeaweedFS) -> None:
    server = private_seaweedfs
    endpoint = server.endpoint
    server.minio_client().put_object(PRIVATE_BUCKET, "a", io.BytesIO(b"graceful"), 8)

    server.restart()
    server.minio_client().put_object(PRIVATE_BUCKET, "b", io.BytesIO(b"crash"), 5)
    server.kill()
    assert not server.is_running()
    server.start()

    assert server.endpoint == endpoint
    # No client retries: the server must be fully ready when start() returns.
    client = server.minio_client(retries=False)
    for key, body in (("a", b"graceful"), ("b", b"crash")):
        response = client.get_object(PRIVATE_BUCKET, key)
        try:
            assert response.read() == body
        finally:
            response.close()
            response.release_conn()


def test_close_is_idempotent(private_seaweedfs: SeaweedFS) -> None:
    pid = private_seaweedfs.pid
    assert pid is not None

    private_seaweedfs.close()
    private_seaweedfs.close()

    assert not private_seaweedfs.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.usefixtures("no_aws_env")
def test_obstore_put_is_visible_to_minio(
    seaweedfs: SeaweedFS, s3_credentials: S3Credentials, minio_client: Minio, s3_bucket: str
) -> None:
    store = make_store(seaweedfs, s3_bucket, s3_credentials)

    obstore.put(store, "from/obstore.bin", b"\x00payload\xff")

    response = minio_client.get_object(s3_bucket, "from/obstore.bin")
    try:
        assert response.read() == b"\x00payload\xff"
    finally:
        response.close()
        response.release_conn()


@pytest.mark.usefixtures("no_aws_env")
def test_obstore_conditional_create_is_honoured(
    seaweedfs: SeaweedFS, s3_credentials: S3Credentials, s3_bucket: str
) -> None:
    store = make_store(seaweedfs, s3_bucket, s3_credentials)

    obstore.put(store, "m.json", b"x", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "m.json", b"y", mode="create")

    assert bytes(obstore.get(store, "m.json").bytes()) == b"x"
