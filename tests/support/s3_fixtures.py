"""pytest fixtures for a real S3 server (SeaweedFS ``weed mini``, no Docker).

Load from tests/conftest.py with ``pytest_plugins = ["support.s3_fixtures"]``
(pyproject's ``pythonpath = ["tests"]`` makes ``support`` importable).

* ``s3_credentials`` (session): random access/secret key for this session.
* ``seaweedfs`` (session): one shared server.
* ``s3_bucket`` (function): a fresh, uniquely named bucket on the shared server.
* ``minio_client`` (session): minio client for the shared server.
* ``private_seaweedfs`` (function): a server of the test's own (bucket
  ``private``) for tests that stop, kill or restart it; closed at teardown.

None of these read ``AWS_*`` variables, and the servers never see them.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from minio import Minio

from .seaweedfs import SeaweedFS

__all__ = [
    "PRIVATE_BUCKET",
    "S3Credentials",
    "minio_client",
    "private_seaweedfs",
    "s3_bucket",
    "s3_credentials",
    "seaweedfs",
    "unique_bucket_name",
]

PRIVATE_BUCKET = "private"


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # keep the secret out of assertion messages
        return f"S3Credentials(access_key={self.access_key!r}, secret_key='***')"


def unique_bucket_name(hint: str = "bucket") -> str:
    """A valid, unique bucket name that starts with a slug of ``hint``."""
    slug = re.sub(r"[^a-z0-9]+", "-", hint.lower()).strip("-")
    slug = slug.removeprefix("test-")[:40].strip("-") or "bucket"
    return f"{slug}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def s3_credentials() -> S3Credentials:
    return S3Credentials(
        access_key="AK" + secrets.token_hex(9).upper(),
        secret_key=secrets.token_urlsafe(30),
    )


@pytest.fixture(scope="session")
def seaweedfs(
    tmp_path_factory: pytest.TempPathFactory, s3_credentials: S3Credentials
) -> Iterator[SeaweedFS]:
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs"),
        s3_credentials.access_key,
        s3_credentials.secret_key,
        buckets=[],
    )
    with server:
        yield server


@pytest.fixture(scope="session")
def minio_client(seaweedfs: SeaweedFS) -> Minio:
    return seaweedfs.minio_client()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS, request: pytest.FixtureRequest) -> str:
    """A new empty bucket on the shared server, named after the test.

    Left in place afterwards: names never repeat and the server is thrown away
    at the end of the session.
    """
    return seaweedfs.make_bucket(unique_bucket_name(request.node.name))


@pytest.fixture
def private_seaweedfs(
    tmp_path_factory: pytest.TempPathFactory, s3_credentials: S3Credentials
) -> Iterator[SeaweedFS]:
    server = SeaweedFS(
        tmp_path_factory.mktemp("seaweedfs-private"),
        s3_credentials.access_key,
        s3_credentials.secret_key,
        buckets=[PRIVATE_BUCKET],
    )
    with server:
        yield server
