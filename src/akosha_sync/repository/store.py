"""The object store client: building an obstore store from the configuration,
telling transient failures from permanent ones, and retrying the former.

obstore reports many different situations as ``GenericError`` with the cause only in
the message text (see the object-storage reference), so classification reads the
text. obstore's own retries are off: we retry here, with the configured backoff, so
that "cannot connect at all" can be reported at once to the hybrid orchestrator.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

import anyio
import obstore
import structlog
from obstore.exceptions import (
    AlreadyExistsError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import LocalStore, S3Store

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.errors import CloudUploadError
from akosha_sync.redact import scrub

if TYPE_CHECKING:
    from obstore.store import ObjectStore, RetryConfig

__all__ = [
    "FAILED",
    "Failure",
    "ManifestConflictError",
    "Refusal",
    "RetryPolicy",
    "classify",
    "commit_manifest",
    "create_once",
    "describe_target",
    "make_store",
    "part_size",
    "request_timeout_seconds",
    "with_retries",
]

T = TypeVar("T")
log = structlog.get_logger("akosha_sync.store")

# An S3 multipart upload allows at most 10,000 parts of at least 5 MiB (but the last).
MIN_PART_SIZE = 5 * 1024 * 1024
# One request may take this long plus its part at the slowest link we still serve:
# 5 MiB parts get 70 s, 100 MiB parts 260 s. The sync's deadline bounds the whole.
_REQUEST_BASE_S = 60.0
_SLOWEST_LINK_BYTES_S = 512 * 1024


class Refusal(Exception):
    """The repository declines what was asked (no such upload, another prune running, a
    damaged piece) for the reason its message gives. Not a store failure: retried never,
    and passed through :func:`with_retries` as it is rather than explained as one."""


class Failure(Enum):
    CONNECT = "connect"  # nothing answered: refused, unresolvable, unreachable
    TRANSIENT = "transient"  # worth another try: reset, timeout, 5xx, throttling
    AUTH = "auth"  # credentials refused
    NO_BUCKET = "no_bucket"
    EXISTS = "exists"  # a conditional create found the key taken
    PERMANENT = "permanent"  # any other 4xx or local misuse


_CONNECT_PATTERNS = re.compile(
    r"connection refused|tcp connect error|dns error|failed to lookup|no route to host|"
    r"network is unreachable|name or service not known|error trying to connect",
    re.IGNORECASE,
)
# How every explained store failure starts (callers with a better word replace it).
FAILED = "cloud storage request failed"
# A status the store answered with decides first: the debug dump obstore appends to
# every message holds its retry settings ("retry_timeout: 1s"), which must not make a
# refused signature read as a timeout (and be retried as one).
_STATUS = re.compile(r"status code: (\d{3})\b")
_TRANSIENT_PATTERNS = re.compile(
    r"connection reset|broken pipe|timed out|(?<!_)timeout|operation timed out|"
    r"error sending request|connection closed|unexpected eof|incomplete message|"
    r"server error|status: 5\d\d|\b50[0-4]\b|slowdown|slow down|throttl|requesttimeout|"
    r"internalerror|serviceunavailable|too many requests|\b429\b|error decoding response body|"
    r"hyper|body write aborted|stream closed",
    re.IGNORECASE,
)
_AUTH_PATTERNS = re.compile(
    r"accessdenied|access denied|signaturedoesnotmatch|invalidaccesskeyid|forbidden|"
    r"\b403\b|unauthori[sz]ed|\b401\b|invalid.*credential",
    re.IGNORECASE,
)
# With no credentials configured, obstore asks the EC2 instance metadata service.
_NO_CREDENTIALS_PATTERNS = re.compile(r"169\.254\.169\.254|latest/api/token", re.IGNORECASE)
_NO_BUCKET_PATTERNS = re.compile(r"nosuchbucket|bucket.*(does not exist|not found)", re.IGNORECASE)


def classify(exc: BaseException) -> Failure:
    """Sort an exception from obstore (or the OS) into what to do about it."""
    if isinstance(exc, AlreadyExistsError | PreconditionError):
        return Failure.EXISTS
    if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
        return Failure.AUTH
    text = str(exc)
    if _NO_CREDENTIALS_PATTERNS.search(text):
        return Failure.AUTH
    if _NO_BUCKET_PATTERNS.search(text):
        return Failure.NO_BUCKET
    if status := _STATUS.search(text):
        code = int(status.group(1))
        if code in (401, 403):
            return Failure.AUTH
        if code == 429 or code >= 500:
            return Failure.TRANSIENT
    if isinstance(exc, ConnectionRefusedError) or _CONNECT_PATTERNS.search(text):
        return Failure.CONNECT
    if isinstance(exc, TimeoutError | ConnectionError) or _TRANSIENT_PATTERNS.search(text):
        return Failure.TRANSIENT
    if _AUTH_PATTERNS.search(text):
        return Failure.AUTH
    return Failure.PERMANENT


def describe_target(config: AkoshaSyncConfig) -> str:
    """'bucket B at ENDPOINT', with no credentials in it."""
    if config.is_local_target:
        return f"folder {config.cloud_bucket!r} under {config.cloud_endpoint}"
    endpoint = config.redacted()["cloud_endpoint"] or "AWS S3 (default endpoint)"
    return f"bucket {config.cloud_bucket!r} at {endpoint}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # obstore messages carry a whole source chain; the useful part is short, and the
    # Rust debug dump after "Debug source:" is for its developers.
    text = text.split("Debug source:", 1)[0].strip() or text
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = " | ".join(lines[:4])
    return summary[:600]


def explain(exc: BaseException, config: AkoshaSyncConfig, what: str) -> str:
    """A sentence a user can act on, naming the bucket, the endpoint and the cause."""
    kind = classify(exc)
    target = describe_target(config)
    cause = _first_line(exc)
    if kind is Failure.AUTH and not config.resolved_access_key_id and (
        _NO_CREDENTIALS_PATTERNS.search(str(exc))
    ):
        advice = (
            "no credentials were found: none in the configuration (access_key_id / "
            "secret_access_key), none in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and no "
            "instance role answered (there is one only on AWS machines); set the keys"
        )
    elif kind is Failure.AUTH:
        advice = (
            "the credentials were refused; check access_key_id / secret_access_key "
            "(or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the key's permissions"
        )
    elif kind is Failure.NO_BUCKET:
        advice = "the bucket does not exist; create it or correct cloud_bucket"
    elif kind is Failure.CONNECT:
        advice = "could not connect; is the server running and is cloud_endpoint right?"
    elif kind is Failure.TRANSIENT:
        advice = "the store kept failing (network or server trouble); try again later"
    else:
        advice = "the store rejected the request"
    if (kind in (Failure.CONNECT, Failure.TRANSIENT) and "error sending request" in cause
            and config.store_endpoint.startswith("https://")):
        # What a TLS handshake with a plain-http server (a local MinIO) looks like.
        advice += (" (if that server speaks plain http, as a local MinIO or SeaweedFS "
                   "usually does, cloud_endpoint must start with http://)")
    # Not "upload": restore, verify, snapshots and prune read through here too.
    stop = "" if advice.endswith("?") else "."
    message = f"{FAILED} while {what}: {advice}{stop} Target: {target}. Cause: {cause}"
    return scrub(message, config)


def part_size(config: AkoshaSyncConfig) -> int:
    """Bytes of one multipart part (``chunk_size_mb``, at least S3's minimum)."""
    return max(config.chunk_size_mb * 1024 * 1024, MIN_PART_SIZE)


def request_timeout_seconds(config: AkoshaSyncConfig) -> int:
    """The per-request timeout, scaled with the part size a request carries."""
    return int(_REQUEST_BASE_S + part_size(config) / _SLOWEST_LINK_BYTES_S)


def make_store(config: AkoshaSyncConfig, *, retries: bool = False) -> ObjectStore:
    """An obstore store for the configured target (S3-compatible or a local folder).

    ``retries``: obstore retries each request itself (transient failures, with the
    configured backoff), for streamed multipart uploads whose whole body cannot be
    produced again; every other caller retries whole operations (:func:`with_retries`).
    """
    if config.is_local_target:
        root = Path(urlsplit(config.store_endpoint).path) / config.cloud_bucket
        return LocalStore(root, mkdir=True)
    endpoint = config.store_endpoint or None
    allow_http = bool(endpoint and endpoint.startswith("http://"))
    kwargs: dict[str, object] = {}
    if endpoint:
        kwargs["endpoint"] = endpoint
    if config.access_key_id:
        kwargs["access_key_id"] = config.access_key_id
        kwargs["secret_access_key"] = config.secret_access_key
    if config.resolved_session_token:  # temporary (STS) credentials
        kwargs["session_token"] = config.resolved_session_token
    region = config.cloud_region
    if region == "auto" and endpoint is None:
        region = "us-east-1"  # 'auto' is R2's; plain AWS needs a real region to sign with
    return S3Store(
        config.cloud_bucket,
        region=region,
        virtual_hosted_style_request=False,
        unsigned_payload=config.transport_protects_payload,
        client_options={
            "allow_http": allow_http,
            "connect_timeout": "5s",
            "timeout": f"{request_timeout_seconds(config)}s",
        },
        retry_config=_own_retries(config)
        if retries
        else {"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
        **kwargs,  # type: ignore[arg-type]
    )


def _own_retries(config: AkoshaSyncConfig) -> RetryConfig:
    backoff = max(config.retry_backoff_seconds, 0.01)
    return {
        "max_retries": config.max_retries,
        "retry_timeout": timedelta(seconds=backoff * 2 ** (config.max_retries + 1) + 5),
        "backoff": {
            "init_backoff": timedelta(seconds=backoff),
            "max_backoff": timedelta(seconds=60),
            "base": 2.0,
        },
    }


class RetryPolicy:
    """Exponential backoff with jitter: ``backoff * 2**n``, scaled by 0.5..1.5."""

    def __init__(self, max_retries: int, backoff: float, *, cap: float = 60.0) -> None:
        self.max_retries = max_retries
        self.backoff = backoff
        self.cap = cap

    @classmethod
    def from_config(cls, config: AkoshaSyncConfig) -> RetryPolicy:
        return cls(config.max_retries, config.retry_backoff_seconds)

    def delay(self, attempt: int) -> float:
        return float(min(self.cap, self.backoff * 2**attempt) * random.uniform(0.5, 1.5))


async def with_retries(
    op: Callable[[], Awaitable[T]],
    *,
    config: AkoshaSyncConfig,
    what: str,
    policy: RetryPolicy | None = None,
    connect_attempts: int | None = None,
) -> T:
    """Run ``op``; retry transient failures, raise ``CloudUploadError`` for the rest.

    ``connect_attempts`` bounds tries when nothing answers at all: the first contact
    uses a small number so a dead store is reported within about a second.
    """
    policy = policy or RetryPolicy.from_config(config)
    attempt = 0
    connect_failures = 0
    while True:
        try:
            return await op()
        except (CloudUploadError, Refusal):
            raise
        except Exception as exc:
            kind = classify(exc)
            if kind is Failure.CONNECT:
                connect_failures += 1
            retryable = kind in (Failure.CONNECT, Failure.TRANSIENT)
            exhausted = attempt >= policy.max_retries or (
                kind is Failure.CONNECT
                and connect_attempts is not None
                and connect_failures >= connect_attempts
            )
            if not retryable or exhausted:
                raise CloudUploadError(
                    explain(exc, config, what),
                    original=exc,
                    connect_failed=kind is Failure.CONNECT,
                ) from exc
            delay = (
                min(0.25 * (attempt + 1), 1.0)
                if kind is Failure.CONNECT and connect_attempts is not None
                else policy.delay(attempt)
            )
            log.warning(
                "cloud operation failed; retrying",
                what=what,
                attempt=attempt + 1,
                max_retries=policy.max_retries,
                retry_in=round(delay, 2),
                cause=_first_line(exc),
            )
            attempt += 1
            await anyio.sleep(delay)


class ManifestConflictError(CloudUploadError):
    """Another writer's manifest is at the key: a real conflict, not our lost answer."""


async def _read_back(store: ObjectStore, key: str) -> bytes | None:
    try:
        return bytes(await (await obstore.get_async(store, key)).bytes_async())
    except FileNotFoundError:
        return None


async def create_once(store: ObjectStore, key: str, body: bytes) -> bool:
    """One attempt at a conditional create that can be retried: True when ``key`` holds
    ``body`` afterwards (written now, or by an earlier attempt whose answer was lost:
    the key is then taken and read back), False when another writer's bytes are there.
    A key reported taken but not readable raises ``TimeoutError`` (worth a retry)."""
    try:
        await obstore.put_async(store, key, body, mode="create")
        return True
    except (AlreadyExistsError, PreconditionError):
        stored = await _read_back(store, key)
    if stored is None:
        raise TimeoutError(f"{key} was reported as existing but could not be read")
    if stored == body:
        log.info("already written by an earlier attempt", key=key)
    return stored == body


async def commit_manifest(
    store: ObjectStore, key: str, body: bytes, *, config: AkoshaSyncConfig
) -> None:
    """Write a manifest (the commit of an upload) with a conditional create, safely retried.

    When a PUT reached the store but its answer was lost, the retry finds the key
    taken: the manifest is read back, and our exact bytes mean the first PUT
    committed (success). Other bytes are another writer's manifest:
    ``ManifestConflictError``. Any other failure raises ``CloudUploadError``: the
    manifest may then exist or not, so the caller must delete nothing of the upload.
    """

    async def attempt() -> None:
        if await create_once(store, key, body):
            return
        raise ManifestConflictError(
            f"another manifest already exists at {key} (not the one this sync wrote); "
            "another machine may use the same system_id. Nothing of that upload was "
            f"deleted. Target: {describe_target(config)}."
        )

    try:
        await with_retries(attempt, config=config, what=f"writing the manifest {key}")
    except ManifestConflictError:
        raise
    except CloudUploadError as exc:
        raise CloudUploadError(
            f"{exc}. The manifest may or may not have been written, so nothing of this "
            "upload was deleted; the next sync makes a new, complete upload.",
            original=exc.original,
            connect_failed=exc.connect_failed,
        ) from exc
