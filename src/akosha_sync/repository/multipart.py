"""Abort incomplete S3 multipart uploads that a failed sync left behind.

When the store dies in the middle of a large upload, obstore's own abort cannot reach
it, and obstore 0.12 has no call to list or abort multipart uploads: the parts already
stored would then be kept (and billed) forever, invisible to ``list``. This module
speaks the two S3 calls itself (``ListMultipartUploads``, ``AbortMultipartUpload``)
over httpx, signed with AWS Signature Version 4, path-style like our obstore store.

What may be aborted (never another system's keys, never a committed upload's):

* right after a failed cloud attempt, the multipart uploads under that attempt's own
  upload folder (:func:`abort_upload`); if the store cannot be reached then, the
  upload id is remembered in ``state_dir`` as abandoned;
* at the start of the next sync (:func:`sweep`), under ``systems/{system_id}/uploads/``,
  for upload folders older than the current one with no manifest: those remembered as
  abandoned by this machine (it holds the sync lock, so no sync of its own runs them),
  those with no claim (a live sync keeps its claim until it ends), and those initiated
  longer ago, by the store's clock, than any sync may last (``upload_timeout_seconds``
  plus a margin).

A sweep that found nothing to abort is not repeated for :data:`SWEEP_INTERVAL` (an hour)
unless this machine remembered an abandoned upload since: an unchanged re-sync stays a
few hundred milliseconds, and an upload left by another machine waits at most that long.

Every error is best effort: logged with secrets scrubbed, never raised to the sync.
``file://`` targets have no multipart uploads: every call is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import msgspec
import structlog

from akosha_sync._fs import atomic_write
from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.redact import scrub
from akosha_sync.repository.manifest import (
    CLAIM_NAME,
    MANIFEST_NAME,
    upload_dir,
    upload_id_order,
    uploads_prefix,
)

if TYPE_CHECKING:
    import httpx  # ~0.1 s: loaded only when a sweep or an abort really talks to the store

__all__ = [
    "IncompleteUpload",
    "abort_upload",
    "list_incomplete",
    "sign_request",
    "sweep",
]

log = structlog.get_logger("akosha_sync.multipart")

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Beyond upload_timeout_seconds (a sync's whole budget): room for clock steps and the
# last requests of a sync that is just ending.
_AGE_MARGIN = timedelta(minutes=10)
_TIMEOUT_S, _CONNECT_TIMEOUT_S = 10.0, 3.0
SWEEP_INTERVAL = timedelta(hours=1)
_MAX_PAGES = 20
_MAX_REMEMBERED = 100


class IncompleteUpload(msgspec.Struct, frozen=True):
    """One multipart upload the store holds, neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: datetime


# ------------------------------------------------------------------ SigV4
def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _encode(text: str, *, safe: str = "") -> str:
    """RFC 3986 percent-encoding as SigV4 wants it (unreserved characters kept)."""
    return quote(text, safe="-_.~" + safe)


def sign_request(
    method: str,
    url: str,
    headers: dict[str, str],
    *,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
    now: datetime,
    payload_sha256: str = _EMPTY_SHA256,
    session_token: str = "",
) -> dict[str, str]:
    """``headers`` plus ``x-amz-date`` (and the token) and the SigV4 ``Authorization``.

    ``url`` is percent-encoded as it goes on the wire; its path is signed as it is
    (S3 does not encode twice), its query is decoded and canonicalized here. Every
    header given is signed, ``host`` included (added from ``url`` if absent).
    """
    parts = urlsplit(url)
    out = {k.lower(): v for k, v in headers.items()}
    out.setdefault("host", parts.netloc.rsplit("@", 1)[-1])
    amz_date = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    out["x-amz-date"] = amz_date
    if session_token:
        out["x-amz-security-token"] = session_token
    pairs = []
    for item in parts.query.split("&") if parts.query else []:
        name, _, value = item.partition("=")
        pairs.append((_encode(unquote(name)), _encode(unquote(value))))
    canonical_query = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    signed = sorted(out)
    canonical_headers = "".join(f"{k}:{' '.join(out[k].split())}\n" for k in signed)
    signed_headers = ";".join(signed)
    canonical = "\n".join([
        method.upper(), parts.path or "/", canonical_query, canonical_headers,
        signed_headers, payload_sha256,
    ])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join([
        "AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest(),
    ])
    key = ("AWS4" + secret_key).encode()
    for step in (amz_date[:8], region, service, "aws4_request"):
        key = _hmac(key, step)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


# --------------------------------------------------------------- the calls
class _Client:
    """The two S3 calls, path-style, with the configuration's endpoint and credentials."""

    def __init__(self, config: AkoshaSyncConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.http = http
        endpoint = config.store_endpoint
        region = config.cloud_region
        if not endpoint:
            region = "us-east-1" if region == "auto" else region
            endpoint = f"https://s3.{region}.amazonaws.com"
        parts = urlsplit(endpoint.rstrip("/"))
        host = parts.netloc.rsplit("@", 1)[-1]  # credentials in the URL are not ours to send
        self.base = urlunsplit((parts.scheme, host, parts.path, "", ""))
        self.region = region
        self.server_now: datetime | None = None  # the store's clock, from its Date header

    async def _request(self, method: str, key: str, query: str) -> httpx.Response:
        path = urlsplit(self.base).path + "/" + _encode(self.config.cloud_bucket)
        if key:  # a bucket-level call has no trailing slash (as minio and obstore send)
            path += "/" + _encode(key, safe="/")
        url = urlunsplit((*urlsplit(self.base)[:2], path, query, ""))
        headers = sign_request(
            method, url, {"x-amz-content-sha256": _EMPTY_SHA256},
            access_key=self.config.resolved_access_key_id,
            secret_key=self.config.resolved_secret_access_key,
            session_token=self.config.resolved_session_token,
            region=self.region, now=datetime.now(UTC),
        )
        response = await self.http.request(method, url, headers=headers)
        if date := response.headers.get("date"):
            with contextlib.suppress(TypeError, ValueError):
                self.server_now = parsedate_to_datetime(date).astimezone(UTC)
        gone = method == "DELETE" and response.status_code == 404  # aborted already
        if response.status_code >= 300 and not gone:
            raise _S3Error(f"{method} {path}?{query} answered {response.status_code}: "
                           f"{response.text[:300]}")
        return response

    async def list(self, prefix: str) -> list[IncompleteUpload]:
        found: list[IncompleteUpload] = []
        markers = ""
        for _ in range(_MAX_PAGES):
            query = f"prefix={_encode(prefix)}&uploads={markers}"
            root = _parse_xml((await self._request("GET", "", query)).content)
            for node in root.iter("Upload"):
                key, uid, at = (node.findtext(n) or "" for n in
                                ("Key", "UploadId", "Initiated"))
                if key.startswith(prefix) and uid:
                    found.append(IncompleteUpload(key, uid, _parse_time(at)))
            if (root.findtext("IsTruncated") or "").lower() != "true":
                break
            key_marker = root.findtext("NextKeyMarker") or ""
            id_marker = root.findtext("NextUploadIdMarker") or ""
            if not key_marker:
                break
            markers = (f"&key-marker={_encode(key_marker)}"
                       f"&upload-id-marker={_encode(id_marker)}")
        return found

    async def exists(self, key: str) -> bool:
        try:
            await self._request("HEAD", key, "")
        except _S3Error as exc:
            if " answered 404" in str(exc):
                return False
            raise
        return True

    async def abort(self, upload: IncompleteUpload) -> None:
        await self._request("DELETE", upload.key, f"uploadId={_encode(upload.upload_id)}")


class _S3Error(Exception):
    pass


def _parse_xml(data: bytes) -> ET.Element:
    """The store's answer; one with a DTD is refused (no entity expansion, ever)."""
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise _S3Error("the store's answer declares a DTD; refused")
    root = ET.fromstring(data)  # noqa: S314 - no DTD, so no entity can expand
    for node in root.iter():  # AWS's namespace or none (some S3-compatible stores)
        node.tag = node.tag.rsplit("}", 1)[-1]
    return root


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return datetime.now(UTC)  # unknown: as young as can be, so never aborted by age


def _http(config: AkoshaSyncConfig) -> httpx.AsyncClient:
    # Proxy and CA variables apply, as they do to obstore's client.
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(_TIMEOUT_S, connect=_CONNECT_TIMEOUT_S), trust_env=True,
        verify=_uses_tls(config.store_endpoint),
    )


def _uses_tls(endpoint: str) -> bool:
    """Whether a request to the store can meet TLS: not for a plain-http endpoint
    reached directly or through a plain-http proxy.

    httpx loads the CA bundle for every client that verifies (~0.1 s of CPU, a
    twentieth of a cold sync), though a connection without TLS never uses it.
    """
    if urlsplit(endpoint).scheme != "http":
        return True  # https, or empty: AWS over https
    import urllib.request

    proxies = urllib.request.getproxies()  # the variables trust_env reads
    proxy = proxies.get("http") or proxies.get("all") or ""
    return urlsplit(proxy).scheme == "https"


# ----------------------------------------------------- remembered failures
def _abandoned_file(config: AkoshaSyncConfig) -> Path:
    return config.state_path / "multipart" / f"{config.system_id_resolved}.json"


def _abandoned(config: AkoshaSyncConfig) -> list[str]:
    try:
        ids = json.loads(_abandoned_file(config).read_bytes())
    except (OSError, ValueError):
        return []  # absent or unreadable: the age rule still sweeps them later
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def _swept_file(config: AkoshaSyncConfig) -> Path:
    return config.state_path / "multipart" / f"{config.system_id_resolved}.swept"


def _swept_recently(config: AkoshaSyncConfig) -> bool:
    try:
        swept = datetime.fromtimestamp(_swept_file(config).stat().st_mtime, UTC)
    except OSError:
        return False
    return datetime.now(UTC) - swept < SWEEP_INTERVAL


def _mark_swept(config: AkoshaSyncConfig) -> None:
    with contextlib.suppress(OSError):
        atomic_write(_swept_file(config), b"")


def _remember(config: AkoshaSyncConfig, ids: list[str]) -> None:
    try:
        if ids:
            atomic_write(_abandoned_file(config), json.dumps(ids[-_MAX_REMEMBERED:]).encode())
        else:
            _abandoned_file(config).unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not record abandoned multipart uploads",
                    file=str(_abandoned_file(config)), error=str(exc))


def _warn(config: AkoshaSyncConfig, what: str, exc: BaseException) -> None:
    log.warning(f"could not {what}; the next sync tries again",
                error=scrub(f"{type(exc).__name__}: {exc}", config)[:500])


# --------------------------------------------------------------- the API
async def abort_upload(config: AkoshaSyncConfig, upload_id: str) -> int:
    """After a failed attempt: abort its multipart uploads; how many were aborted.

    If the store cannot be asked, ``upload_id`` is remembered for :func:`sweep`.
    """
    if config.is_local_target:
        return 0
    prefix = upload_dir(config.system_id_resolved, upload_id) + "/"
    aborted = 0
    try:
        async with _http(config) as http:
            client = _Client(config, http)
            for upload in await client.list(prefix):
                await client.abort(upload)
                aborted += 1
    except Exception as exc:  # the store may be the very thing that failed
        _warn(config, f"abort the incomplete multipart uploads of {upload_id}", exc)
        _remember(config, [*(i for i in _abandoned(config) if i != upload_id), upload_id])
        return aborted
    if aborted:
        log.info("aborted incomplete multipart uploads", upload_id=upload_id, count=aborted)
    return aborted


async def list_incomplete(config: AkoshaSyncConfig) -> list[IncompleteUpload]:
    """This system's incomplete multipart uploads (raises on a store error)."""
    if config.is_local_target:
        return []
    async with _http(config) as http:
        return await _Client(config, http).list(uploads_prefix(config.system_id_resolved))


async def sweep(config: AkoshaSyncConfig, current_upload_id: str) -> int:
    """At the start of a sync (under the sync lock): abort what earlier syncs left.

    Only upload folders older than ``current_upload_id`` with no manifest, and only
    those no live sync can own (see the module docstring). Returns how many.
    """
    if config.is_local_target:
        return 0
    sid = config.system_id_resolved
    prefix = uploads_prefix(sid)
    remembered = set(_abandoned(config))
    if not remembered and _swept_recently(config):
        return 0
    max_age = timedelta(seconds=config.upload_timeout_seconds) + _AGE_MARGIN
    aborted = 0
    try:
        async with _http(config) as http:
            client = _Client(config, http)
            by_folder: dict[str, list[IncompleteUpload]] = {}
            for upload in await client.list(prefix):
                folder = upload.key[len(prefix):].split("/", 1)[0]
                if folder and upload_id_order(folder) < upload_id_order(current_upload_id):
                    by_folder.setdefault(folder, []).append(upload)
            now = client.server_now or datetime.now(UTC)
            for folder, uploads in by_folder.items():
                base = upload_dir(sid, folder)
                if await client.exists(f"{base}/{MANIFEST_NAME}"):
                    continue  # committed: never touched
                dead = folder in remembered or not await client.exists(f"{base}/{CLAIM_NAME}")
                for upload in uploads:
                    if dead or now - upload.initiated > max_age:
                        await client.abort(upload)
                        aborted += 1
    except Exception as exc:
        _warn(config, "sweep incomplete multipart uploads", exc)
        return aborted
    # Remembered ids are settled once a sweep got through (aborted, or nothing left).
    _remember(config, [i for i in _abandoned(config) if i not in remembered])
    _mark_swept(config)
    if aborted:
        log.info("aborted incomplete multipart uploads left by earlier syncs", count=aborted)
    return aborted

