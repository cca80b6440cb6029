"""Retry policy and error classification: faults injected at the operation seam."""

from __future__ import annotations

import time

import anyio
import pytest
from obstore.exceptions import GenericError, PermissionDeniedError

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.repository.store import Failure, RetryPolicy, classify, explain, with_retries
from akosha_sync.sync.protocol import CloudUploadError

CONFIG = AkoshaSyncConfig(cloud_bucket="bucket", cloud_endpoint="http://127.0.0.1:9000",
                          max_retries=3, retry_backoff_seconds=0.1)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (GenericError("error sending request: tcp connect error: Connection refused"),
         Failure.CONNECT),
        (GenericError("Server returned non-2xx status code: 503 Service Unavailable: SlowDown"),
         Failure.TRANSIENT),
        (GenericError("connection reset by peer"), Failure.TRANSIENT),
        (GenericError("403 Forbidden: SignatureDoesNotMatch"), Failure.AUTH),
        (PermissionDeniedError("denied"), Failure.AUTH),
        (GenericError("Error performing PUT http://169.254.169.254/latest/api/token"),
         Failure.AUTH),
        (GenericError("404 Not Found: NoSuchBucket"), Failure.NO_BUCKET),
        (GenericError("400 Bad Request: InvalidArgument"), Failure.PERMANENT),
        # obstore's whole message for a refused signature: its debug dump names a
        # retry_timeout, which is not a timeout.
        (GenericError(
            "Generic S3 error: Error performing list request: Error performing GET "
            "http://127.0.0.1:9000/b?list-type=2 in 1.05ms - Server returned non-2xx status "
            "code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>\n\n"
            "Debug source:\nGeneric { store: \"S3\", source: ListRequest { source: "
            "RetryError(RetryErrorImpl { method: GET, retries: 0, max_retries: 0, elapsed: "
            "1.05ms, retry_timeout: 1s, inner: Status { status: 403, body: None } }) } }"),
         Failure.AUTH),
        (GenericError("Server returned non-2xx status code: 500 Internal Server Error: "
                      "retry_timeout: 1s"), Failure.TRANSIENT),
    ],
)
def test_classify(exc: Exception, kind: Failure) -> None:
    assert classify(exc) is kind


def test_the_explanation_keeps_the_store_s_answer_and_drops_the_rust_debug_dump() -> None:
    exc = GenericError(
        "Generic S3 error: Error performing GET http://127.0.0.1:9000/bucket/k in 1ms - "
        "Server returned non-2xx status code: 403 Forbidden: SignatureDoesNotMatch\n\n"
        "Debug source:\nGeneric {\n    store: \"S3\",\n    source: RetryError { .. }\n}")
    text = explain(exc, CONFIG, "reading k")
    assert "credentials were refused" in text and "403 Forbidden: SignatureDoesNotMatch" in text
    assert "Debug source" not in text and "Generic {" not in text, text


def test_no_credentials_at_all_is_not_called_a_refused_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no keys, obstore asks the EC2 metadata service; its refusal (or silence) is
    not the user's key being refused."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    exc = GenericError("Generic S3 error: Error performing PUT http://169.254.169.254/latest/"
                       "api/token in 1.3ms - Server returned non-2xx status code: 403 Forbidden")
    text = explain(exc, AkoshaSyncConfig(cloud_bucket="bucket"), "reserving an upload id")
    assert "no credentials were found" in text and "set the keys" in text, text
    assert "were refused" not in text
    keyed = explain(exc, AkoshaSyncConfig(cloud_bucket="bucket", access_key_id="AKIA1234",
                                          secret_access_key="s" * 20), "reading k")
    assert "the credentials were refused" in keyed


def test_backoff_grows_with_jitter() -> None:
    policy = RetryPolicy(5, 1.0, cap=60)
    for attempt in range(5):
        for _ in range(20):
            assert 0.5 * 2**attempt <= policy.delay(attempt) <= 1.5 * 2**attempt


def test_transient_failures_are_retried_then_succeed() -> None:
    calls: list[float] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise GenericError("connection reset by peer")
        return "ok"

    assert anyio.run(lambda: with_retries(flaky, config=CONFIG, what="testing")) == "ok"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.05  # backed off


def test_retries_stop_at_max_retries() -> None:
    calls = 0

    async def always() -> None:
        nonlocal calls
        calls += 1
        raise GenericError("500 Internal Server Error")

    with pytest.raises(CloudUploadError) as info:
        anyio.run(lambda: with_retries(always, config=CONFIG, what="testing"))
    assert calls == CONFIG.max_retries + 1
    assert "kept failing" in str(info.value) and "bucket 'bucket'" in str(info.value)


def test_permanent_failures_are_not_retried() -> None:
    calls = 0

    async def denied() -> None:
        nonlocal calls
        calls += 1
        raise PermissionDeniedError("403 AccessDenied")

    with pytest.raises(CloudUploadError, match="credentials were refused"):
        anyio.run(lambda: with_retries(denied, config=CONFIG, what="testing"))
    assert calls == 1


def test_unreachable_store_gives_up_quickly_on_first_contact() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise GenericError("tcp connect error: Connection refused")

    slow = AkoshaSyncConfig(cloud_bucket="bucket", max_retries=10, retry_backoff_seconds=30)
    started = time.monotonic()
    with pytest.raises(CloudUploadError) as info:
        anyio.run(lambda: with_retries(refused, config=slow, what="testing", connect_attempts=2))
    assert time.monotonic() - started < 1.5
    assert calls == 2 and info.value.connect_failed
