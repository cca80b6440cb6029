"""Configuration: one frozen ``AkoshaSyncConfig`` and the loader that builds it.

Values come, in rising priority, from the defaults below, a TOML file, and the
environment (``AKOSHA_SYNC_<FIELD>``, with Session-Buddy's ``SESSION_BUDDY_AKOSHA_<FIELD>``
and, from Session-Buddy 0.32, ``SESSION_BUDDY_CLOUD_SYNC__<FIELD>`` honoured too, in
that order of precedence). Construction never fails on a bad *value*: ``validate()`` reports every
problem at once, so a status screen can show them all. Only a value of the wrong *type*
(``max_retries = "lots"``) stops loading, with a ``ConfigError`` naming each such field.

Secrets (``secret_access_key``, ``akosha_token``, credentials inside an endpoint URL)
never leave this object except through ``redacted()``; ``repr()`` is redacted too.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit, urlunsplit

import msgspec

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIXES",
    "REDACTED",
    "SECRET_FIELDS",
    "AkoshaSyncConfig",
    "ConfigError",
    "ForceMethod",
    "endpoint_identity",
    "load_config",
    "normalize_endpoint",
    "system_id_problem",
    "url_identity",
]

ForceMethod = Literal["auto", "cloud", "http"]

REDACTED = "***redacted***"
SECRET_FIELDS = frozenset({"secret_access_key", "akosha_token", "daemon_token", "session_token"})
# Earlier prefixes win: our own names, then Session-Buddy's flat names, then the
# nested ``cloud_sync`` settings of Session-Buddy 0.32+ (``..._CLOUD_SYNC__CLOUD_BUCKET``):
# the more specific a name is to akosha-sync, the more deliberately it was set.
ENV_PREFIXES = ("AKOSHA_SYNC_", "SESSION_BUDDY_AKOSHA_", "SESSION_BUDDY_CLOUD_SYNC__")
DEFAULT_CONFIG_PATH = Path("~/.config/akosha-sync/config.toml")

_SYSTEM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_DURATION_RE = re.compile(r"^(\d+[ymwdh])+$")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class ConfigError(ValueError):
    """The configuration could not be loaded; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid akosha-sync configuration:\n  - " + "\n  - ".join(problems))


def _default_state_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return str(Path(base) / "akosha-sync")


class AkoshaSyncConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of akosha-sync. The first block is the seed's, with its defaults."""

    cloud_bucket: str = ""
    cloud_endpoint: str = ""
    cloud_region: str = "auto"
    system_id: str = ""
    upload_on_session_end: bool = True
    enable_fallback: bool = True
    force_method: str = "auto"
    upload_timeout_seconds: int = 300
    max_retries: int = 3
    retry_backoff_seconds: float = 2.0
    enable_compression: bool = True
    enable_deduplication: bool = True
    chunk_size_mb: int = 5

    # Where the Session-Buddy databases live and what they are called.
    data_dir: str = "~/.claude/data"
    reflection_db: str = "reflection.duckdb"
    knowledge_graph_db: str = "knowledge_graph.duckdb"
    # Our own state: what was uploaded, snapshots in progress, the job queue.
    state_dir: str = msgspec.field(default_factory=_default_state_dir)
    # Empty means ``~/.claude/logs/akosha-sync.log`` (the seed's log folder).
    log_file: str = ""
    # Also write Akosha's ingestion file (memories.json) beside each upload.
    export_memories: bool = True

    # Plain http:// is refused for non-local endpoints unless this is set (e.g. MinIO on a
    # private docker network); data and request signatures then travel unencrypted.
    allow_plain_http: bool = False

    # Credentials for the object store; empty falls back to AWS_* variables.
    access_key_id: str = ""
    secret_access_key: str = ""

    # Akosha's own MCP endpoint, the fallback when the cloud cannot be reached.
    akosha_url: str = "http://localhost:8682/mcp"
    akosha_token: str = ""
    http_batch_size: int = 1000

    # The local daemon (``akosha-sync serve --transport http``) and its hook route.
    daemon_host: str = "127.0.0.1"
    daemon_port: int = 8683
    # When set, every route but /health requires ``Authorization: Bearer <token>``.
    daemon_token: str = ""

    # Long sessions (issue 10): the daemon also syncs every this many minutes while the
    # databases change; 0 turns it off (session ends and compactions still sync).
    sync_interval_minutes: int = 0

    # Security (issue 9): temporary credentials (STS) for the object store; empty falls
    # back to AWS_SESSION_TOKEN.
    session_token: str = ""

    # Retention (issue 7): restic-style forget policy the daemon applies after each
    # successful cloud sync. All unset (the default) keeps every upload.
    retention_keep_last: int = 0
    retention_keep_hourly: int = 0
    retention_keep_daily: int = 0
    retention_keep_weekly: int = 0
    retention_keep_monthly: int = 0
    retention_keep_yearly: int = 0
    retention_keep_within: str = ""  # e.g. "30d", "1y6m"

    # Storage layout in the bucket (issue 8): "blocks" stores each database as
    # SHA-256-addressed pieces in shared packs (incremental); "files" as whole objects.
    storage_layout: str = "blocks"

    # ----------------------------------------------------------------- derived
    @property
    def store_endpoint(self) -> str:
        """``cloud_endpoint`` in its one spelling (:func:`normalize_endpoint`): what
        the store clients are given."""
        return normalize_endpoint(self.cloud_endpoint)

    @property
    def is_local_target(self) -> bool:
        """True when the 'cloud' is a local directory (``file://`` endpoint)."""
        return self.store_endpoint.startswith("file://")

    @property
    def transport_protects_payload(self) -> bool:
        """True when the bytes cannot be altered on the way to the store: TLS (an
        ``https`` or default AWS endpoint) or a loopback address. Then requests are
        signed without hashing their bodies (S3's ``UNSIGNED-PAYLOAD``), which spares
        a SHA-256 of every byte on both sides; plain http elsewhere stays fully signed."""
        if not self.cloud_endpoint:
            return True  # AWS's own https endpoint
        parts = urlsplit(self.cloud_endpoint)
        if parts.scheme == "https":
            return True
        return parts.scheme == "http" and _is_loopback(parts.hostname or "")

    @property
    def cloud_configured(self) -> bool:
        """A bucket is named (for ``file://`` endpoints the bucket is a sub-folder)."""
        return bool(self.cloud_bucket.strip())

    @property
    def system_id_resolved(self) -> str:
        """The explicit system id, else this host's name in Akosha's charset."""
        if self.system_id:
            return self.system_id
        return sanitize_system_id(socket.gethostname())

    @property
    def should_use_cloud(self) -> bool:
        return self.cloud_configured and self.force_method in ("auto", "cloud")

    @property
    def should_use_http(self) -> bool:
        if self.force_method == "http":
            return True
        if self.force_method == "cloud":
            return False
        return self.enable_fallback or not self.cloud_configured

    @property
    def resolved_access_key_id(self) -> str:
        return self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID", "")

    @property
    def resolved_secret_access_key(self) -> str:
        return self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")

    @property
    def resolved_session_token(self) -> str:
        # obstore reads AWS_SESSION_TOKEN itself whatever the keys; say what it will send.
        return self.session_token or os.environ.get("AWS_SESSION_TOKEN", "")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser()

    @property
    def log_path(self) -> Path:
        return Path(self.log_file or "~/.claude/logs/akosha-sync.log").expanduser()

    @property
    def daemon_url(self) -> str:
        host = f"[{self.daemon_host}]" if ":" in self.daemon_host else self.daemon_host
        return f"http://{host}:{self.daemon_port}"

    @property
    def database_paths(self) -> dict[str, Path]:
        """The two source databases by their file names."""
        return {
            self.reflection_db: self.data_path / self.reflection_db,
            self.knowledge_graph_db: self.data_path / self.knowledge_graph_db,
        }

    def secrets(self) -> list[str]:
        """Every secret value in force, for scrubbing text that leaves the process."""
        key_id = self.resolved_access_key_id
        values = [
            # Key ids are not secret, but they identify an account; keep them out too.
            # Short ones (a MinIO user like "akosha") would blank out ordinary words.
            key_id if len(key_id) >= 16 else "",
            self.secret_access_key,
            self.akosha_token,
            self.daemon_token,
            self.resolved_secret_access_key,
            self.session_token,
            os.environ.get("AWS_SESSION_TOKEN", ""),
            _url_password(self.cloud_endpoint),
            _url_password(self.akosha_url),
            # A URL's user is a token when no password follows it, and a key id else
            # (short users, like key ids, stay: they would blank out ordinary words).
            *(user for url in (self.cloud_endpoint, self.akosha_url)
              if len(user := _url_user(url)) >= 16
              or (len(user) >= 12 and not _url_password(url))),
        ]
        return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    # -------------------------------------------------------------- validation
    def validate(self) -> list[str]:
        """Every problem with this configuration, as sentences that say what to do."""
        problems: list[str] = []
        _check_range(problems, "upload_timeout_seconds", self.upload_timeout_seconds, 30, 3600)
        _check_range(problems, "max_retries", self.max_retries, 0, 10)
        _check_range(problems, "retry_backoff_seconds", self.retry_backoff_seconds, 0.1, 60)
        _check_range(problems, "chunk_size_mb", self.chunk_size_mb, 1, 100)
        _check_range(problems, "http_batch_size", self.http_batch_size, 1, 1000)
        _check_range(problems, "daemon_port", self.daemon_port, 0, 65535)  # 0: any free port
        if self.force_method not in ("auto", "cloud", "http"):
            problems.append(
                f"force_method is {self.force_method!r}; use one of 'auto', 'cloud' or 'http'."
            )
        if self.system_id and not _SYSTEM_ID_RE.match(self.system_id):
            problems.append(
                f"system_id {self.system_id!r} may only contain letters, digits, '_' and '-' "
                "(at most 100 characters), as Akosha requires; "
                f"for example {sanitize_system_id(self.system_id)!r}."
            )
        if not self.cloud_region.strip():
            problems.append("cloud_region is empty; use 'auto' or your bucket's region.")
        elif _has_space(self.cloud_region):
            problems.append(
                f"cloud_region {self.cloud_region!r} contains a space or a line break; use the "
                "region's name alone, like 'us-east-1' or 'auto'."
            )
        # Keys go into every request's signature: a stray newline (a pasted value) would
        # make each request fail deep in the HTTP client. The values are never shown.
        for name in ("access_key_id", "secret_access_key"):
            if _has_space(getattr(self, name)):
                problems.append(
                    f"{name} contains a space or a line break; paste the key alone."
                )
        problems.extend(self._endpoint_problems())
        if self.cloud_bucket and not self.is_local_target and not _BUCKET_RE.match(
            self.cloud_bucket
        ):
            problems.append(
                f"cloud_bucket {self.cloud_bucket!r} is not a valid bucket name: use 3-63 "
                "lowercase letters, digits, '.' or '-', starting and ending with a letter "
                "or digit."
            )
        if self.cloud_bucket and self.is_local_target and not _SYSTEM_ID_RE.match(
            self.cloud_bucket
        ):
            problems.append(
                f"cloud_bucket {self.cloud_bucket!r} names a folder under the file:// endpoint; "
                "use letters, digits, '_' or '-'."
            )
        if self.cloud_endpoint and not self.cloud_bucket:
            problems.append(
                "cloud_endpoint is set but cloud_bucket is empty; name the bucket to upload to."
            )
        if bool(self.access_key_id) != bool(self.secret_access_key):
            problems.append(
                "only one of access_key_id and secret_access_key is set; set both, or neither "
                "to use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
            )
        if _slashed_userinfo(self.akosha_url):
            problems.append(_slashed_problem("akosha_url"))
        url = urlsplit(self.akosha_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            problems.append(
                f"akosha_url {_redact_url(self.akosha_url)!r} is not an http(s) URL; "
                "use e.g. 'http://localhost:8682/mcp'."
            )
        for name in ("reflection_db", "knowledge_graph_db"):
            value = getattr(self, name)
            if not value or "/" in value or value in (".", ".."):
                problems.append(f"{name} {value!r} must be a bare file name inside data_dir.")
        if self.reflection_db and self.reflection_db == self.knowledge_graph_db:
            problems.append(
                f"reflection_db and knowledge_graph_db are both {self.reflection_db!r}; they "
                "are two databases: give each its own file name."
            )
        # Long sessions (issue 10).
        _check_range(problems, "sync_interval_minutes", self.sync_interval_minutes, 0, 1440)
        # Security (issue 9): the token would travel in clear text.
        if insecure := self.akosha_url_insecure():
            problems.append(insecure)
        # Retention (issue 7): the same rules as repository.retention.Policy.problems().
        for name, value in self.retention_policy_fields().items():
            if isinstance(value, int) and value < 0:
                problems.append(f"retention_{name} is {value}; use a count of 0 or more.")
        if self.retention_keep_within and not _DURATION_RE.match(
            self.retention_keep_within.strip().lower()
        ):
            problems.append(
                f"retention_keep_within {self.retention_keep_within!r} is not a duration; "
                "write it like restic: '30d', '12h', '1y6m', '3w'."
            )
        problems.extend(self._path_problems())
        if self.storage_layout not in ("blocks", "files"):
            problems.append(
                f"storage_layout is {self.storage_layout!r}; use 'blocks' (incremental pieces "
                "in packs) or 'files' (whole database objects)."
            )
        return problems

    def akosha_url_insecure(self) -> str:
        """Why ``akosha_url`` may not be used (plain http to a remote host), or ''."""
        url = urlsplit(self.akosha_url)
        if (
            url.scheme != "http" or not url.hostname or _is_loopback(url.hostname)
            or self.allow_plain_http
        ):
            return ""
        return (
            f"akosha_url {_redact_url(self.akosha_url)!r} uses plain http to a non-local "
            "host, which would send akosha_token and your memories unencrypted; use "
            "https:// (plain http is accepted only for localhost, or with "
            "allow_plain_http = true on a private network)."
        )

    def retention_policy_fields(self) -> dict[str, Any]:
        """The ``retention_*`` settings as ``repository.retention.Policy`` fields."""
        prefix = "retention_"
        return {
            name[len(prefix):]: getattr(self, name)
            for name in self.__struct_fields__
            if name.startswith(prefix)
        }

    def _path_problems(self) -> list[str]:
        """The one check that looks at the disk (a few stats): a folder setting that
        names a file, which every command would otherwise meet as a traceback."""
        problems = [
            problem
            for name, path in (("data_dir", self.data_path), ("state_dir", self.state_path),
                               ("log_file's folder", self.log_path.parent))
            if (problem := _not_a_folder(name, path))
        ]
        if _is_dir(self.log_path):
            problems.append(
                f"log_file {str(self.log_path)!r} is a folder; name a file in it, like "
                f"'{self.log_path / 'akosha-sync.log'}'."
            )
        return problems

    def _endpoint_problems(self) -> list[str]:
        endpoint = self.cloud_endpoint
        if not endpoint:
            return []
        shown = _redact_url(endpoint)
        if _slashed_userinfo(endpoint):  # parsed, the password would read as the server
            return [_slashed_problem("cloud_endpoint")]
        if _has_space(endpoint):
            return [
                f"cloud_endpoint {shown!r} contains a space or a line break; give the URL "
                "alone, like 'https://s3.example.com'."
            ]
        parts = urlsplit(endpoint)
        if parts.scheme == "file":
            if not parts.path.startswith("/") or parts.netloc not in ("", "localhost"):
                return [
                    f"cloud_endpoint {shown!r} must be an absolute local folder, "
                    "like 'file:///srv/akosha-backup'."
                ]
            return []
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return [
                f"cloud_endpoint {shown!r} is not a URL; use 'https://HOST' for S3/R2, "
                "'http://127.0.0.1:PORT' for a local MinIO/SeaweedFS, or 'file:///PATH'."
            ]
        if parts.path.strip("/") or parts.query or parts.fragment:
            # The bucket is addressed by path below the endpoint: a path here would put
            # every object under a wrong key (seen: '.../akosha/akosha/systems/...').
            server = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
            return [
                f"cloud_endpoint {shown!r} has a path; give the server alone "
                f"({_redact_url(server)!r}) and the bucket in cloud_bucket."
            ]
        if (
            parts.scheme == "http"
            and not _is_loopback(parts.hostname)
            and not self.allow_plain_http
        ):
            return [
                f"cloud_endpoint {shown!r} uses plain http to a non-local host, which would "
                "send your data and signatures unencrypted; use https:// (plain http is "
                "accepted only for localhost, or with allow_plain_http = true on a private "
                "network)."
            ]
        return []

    # --------------------------------------------------------------- rendering
    def redacted(self) -> dict[str, Any]:
        """All settings as a dict, secrets replaced: the only form that may be shown."""
        out = msgspec.structs.asdict(self)
        for name in SECRET_FIELDS:
            if out[name]:
                out[name] = REDACTED
        if out["access_key_id"]:
            out["access_key_id"] = _mask_key_id(out["access_key_id"])
        out["cloud_endpoint"] = _redact_url(out["cloud_endpoint"])
        out["akosha_url"] = _redact_url(out["akosha_url"])
        return out

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"AkoshaSyncConfig({fields})"

    __str__ = __repr__

    # ---------------------------------------------------------------- factory
    @classmethod
    def from_settings(cls, settings: object) -> AkoshaSyncConfig:
        """Build from a Session-Buddy ``SessionMgmtSettings``-like object or mapping.

        For each field, ``akosha_<field>`` is looked up first, then ``<field>``;
        missing ones keep their defaults.
        """
        values: dict[str, Any] = {}
        for name in cls.__struct_fields__:
            for attr in (f"akosha_{name}", name):
                value = (
                    settings.get(attr)
                    if isinstance(settings, Mapping)
                    else getattr(settings, attr, None)
                )
                if value is not None:
                    values[name] = str(value) if isinstance(value, Path) else value
                    break
        return _build(values, source="settings")


def system_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be a system id (one asked for with --system), or None."""
    if _SYSTEM_ID_RE.match(value):
        return None
    return (f"{value!r} is not a system id: system ids are letters, digits, '_' and '-' "
            "(at most 100 characters). `akosha-sync snapshots --all-systems` lists the "
            "systems in the bucket.")


def sanitize_system_id(name: str) -> str:
    """Map any host name onto Akosha's system-id charset ``[A-Za-z0-9_-]``."""
    cleaned = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
    return (cleaned or "unknown-host")[:100]


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AkoshaSyncConfig:
    """Defaults < TOML file < environment < ``overrides`` (e.g. command-line flags).

    The file is ``path``, else ``$AKOSHA_SYNC_CONFIG``, else
    ``~/.config/akosha-sync/config.toml``; only an explicitly named file must exist.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for the error messages
    explicit = path if path is not None else env.get("AKOSHA_SYNC_CONFIG")
    file_path = Path(explicit or DEFAULT_CONFIG_PATH).expanduser()
    if file_path.exists():
        values.update(_read_toml(file_path))
        sources.update(dict.fromkeys(values, str(file_path)))
    elif explicit:
        raise ConfigError([f"config file {str(file_path)!r} does not exist; create it or "
                           "drop --config / AKOSHA_SYNC_CONFIG."])
    for name, (variable, value) in _from_environ(env).items():
        values[name] = value
        sources[name] = f"the environment variable {variable}"
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            sources[name] = "the command line"
    return _build(values, source=sources)


# ------------------------------------------------------------------ helpers
def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {str(path)!r}: {exc}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"config file {str(path)!r} is not valid TOML: {exc}"]) from exc
    # Accept both a flat file and one with an [akosha-sync] / [akosha_sync] table.
    for table in ("akosha-sync", "akosha_sync"):
        if isinstance(data.get(table), dict):
            data = {**{k: v for k, v in data.items() if k != table}, **data[table]}
    return data


def _from_environ(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Setting -> (the variable it came from, its value)."""
    values: dict[str, tuple[str, str]] = {}
    for prefix in reversed(ENV_PREFIXES):  # later prefixes in ENV_PREFIXES lose
        for name in AkoshaSyncConfig.__struct_fields__:
            key = prefix + name.upper()
            if key in env:
                values[name] = (key, env[key])
    return values


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _coerce(name: str, value: Any, kind: type) -> Any:
    """Turn environment strings into the field's type; raise ValueError if impossible."""
    if kind is bool and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ValueError(f"{name} must be true or false, not {value!r}")
    if kind is int and isinstance(value, str):
        return int(value.strip())
    if kind is float and isinstance(value, str | int) and not isinstance(value, bool):
        return float(value)
    return value


def _build(values: dict[str, Any], *, source: str | Mapping[str, str]) -> AkoshaSyncConfig:
    """``source``: where the values came from, one place or one per setting."""
    fields = AkoshaSyncConfig.__struct_fields__
    where = (lambda name: source) if isinstance(source, str) else source.get
    problems: list[str] = []
    clean: dict[str, Any] = {}
    types = {f.name: f.type for f in msgspec.structs.fields(AkoshaSyncConfig)}
    for name, value in values.items():
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"unknown setting {name!r} in {where(name)}{hint}")
            continue
        kind = types[name]
        try:
            coerced = _coerce(name, value, kind)
            msgspec.convert({name: coerced}, _single_field_type(name))
        except (ValueError, msgspec.ValidationError):
            shown = REDACTED if name in SECRET_FIELDS else repr(value)
            problems.append(f"{name} must be {_type_name(kind)}, not {shown} (from "
                            f"{where(name)})")
            continue
        clean[name] = coerced
    if problems:
        raise ConfigError(problems)
    return AkoshaSyncConfig(**clean)


_SINGLE_FIELD_TYPES: dict[str, type] = {}


def _single_field_type(name: str) -> type:
    """A one-field Struct per setting, so each value is type-checked on its own."""
    if name not in _SINGLE_FIELD_TYPES:
        kind = {f.name: f.type for f in msgspec.structs.fields(AkoshaSyncConfig)}[name]
        _SINGLE_FIELD_TYPES[name] = msgspec.defstruct(f"_Check_{name}", [(name, kind)])
    return _SINGLE_FIELD_TYPES[name]


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(
        kind, str(kind)
    )


def _not_a_folder(name: str, path: Path) -> str:
    """Why ``path`` cannot be (or become) a folder, or ''."""
    probe = path
    try:
        while not probe.exists() and probe.parent != probe:  # False too under a file
            probe = probe.parent
        if probe.is_dir():
            return ""
    except OSError:  # not ours to look at (permissions): the command that uses it says so
        return ""
    what = "is a file" if probe == path else f"cannot be a folder: {str(probe)!r} is a file"
    return f"{name} {str(path)!r} {what}; point it at a folder, or move that file away."


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _has_space(value: str) -> bool:
    return any(ch.isspace() or not ch.isprintable() for ch in value)


def _check_range(problems: list[str], name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        problems.append(f"{name} is {value}; it must be between {low} and {high}.")


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_endpoint(url: str) -> str:
    """One spelling of an endpoint: ``HTTP://Host:80/`` is ``http://host``,
    ``file:///data/store/`` is ``file:///data/store``.

    Scheme and host lowercased, a default port and a trailing ``/`` dropped, a
    ``file://`` path with its doubled and trailing slashes collapsed (``..`` is kept:
    through a symlink it is not the same folder). A value that ``validate`` refuses
    is returned unchanged, so its error still quotes what the user wrote.
    """
    if not url or _has_space(url) or (split := _split(url)) is None:
        return url
    parts, port = split
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        return url
    if scheme == "file":
        if parts.netloc or not parts.path.startswith("/"):
            return url
        return "file://" + str(PurePosixPath("/" + parts.path.lstrip("/")))
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.path.strip("/"):
        return url
    userinfo = parts.netloc.rpartition("@")[0]
    server = _server(scheme, parts.hostname, port)
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{server}"


def endpoint_identity(url: str) -> str:
    """The endpoint as the name of a store: normalized, without any credentials in
    it. Rewriting the URL's spelling, or its password, names the same store; this
    is what local state about a store is keyed by (and it may be written to disk)."""
    return url_identity(normalize_endpoint(url))


def url_identity(url: str) -> str:
    """An http(s) URL as the name of a service: scheme and host lowercased, a default
    port, any credentials and a trailing ``/`` dropped (the path's case is kept).
    Anything else is returned as written."""
    if (split := _split(url)) is None:
        return url
    parts, port = split
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return url
    server = _server(scheme, parts.hostname, port)
    return urlunsplit((scheme, server, parts.path.rstrip("/"), parts.query, ""))


def _split(url: str) -> tuple[SplitResult, int | None] | None:
    """The URL's parts and port, or None where its server part cannot be read."""
    try:
        parts = urlsplit(url)
        return parts, parts.port
    except ValueError:
        return None


def _server(scheme: str, hostname: str, port: int | None) -> str:
    """``host[:port]`` as a URL writes it: the host (already lowercased by urlsplit)
    bracketed if IPv6, the port left out when it is the scheme's default."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# user:password@ where a URL parser finds none: no scheme ("user:pw@host:9000"), or a
# mistyped one ("ht!tp://user:pw@host"). Such a value is refused, and named in the refusal.
_USERINFO = re.compile(r"(^|//)([^/?#@\s]*?):([^/?#@\s]+)@")


def _slashed_userinfo(url: str) -> tuple[int, int] | None:
    """Where a ``user:pass@`` whose password holds a '/' lies (``https://u:p/q@host``):
    URL parsers end the server at the first '/' and find no credentials at all, so
    they would be shown, logged and sent as a path. None when there is no such part."""
    if "://" in url and not url.lower().startswith(("http://", "https://")):
        return None  # file:///path: no credentials, and ':' '@' '/' are the path's
    start = url.find("//")
    start = start + 2 if start >= 0 else 0
    ends = [i for i in (url.find(c, start) for c in "/?#") if i >= 0]
    if "@" in url[start:min(ends, default=len(url))]:
        return None  # an ordinary user:password@host: the parser sees it
    stop = min([i for i in (url.find(c, start) for c in "?#") if i >= 0], default=len(url))
    at = url.rfind("@", start, stop)
    if at < 0 or ":" not in url[start:at] or "/" not in url[start:at]:
        return None
    return start, at


def _slashed_problem(name: str) -> str:
    return (f"{name} has credentials (user:password@) whose password holds a '/'; write "
            "it as %2F, or leave the credentials out of the URL (for the store: "
            "access_key_id and secret_access_key).")


def _url_password(url: str) -> str:
    if span := _slashed_userinfo(url):
        return url[span[0]:span[1]].split(":", 1)[1]
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        return password
    match = _USERINFO.search(url)
    return match.group(3) if match else ""


def _url_user(url: str) -> str:
    """The user of a URL's credentials (often a token itself, ``https://TOKEN@host``)."""
    if span := _slashed_userinfo(url):
        return url[span[0]:span[1]].split(":", 1)[0]
    try:
        return urlsplit(url).username or ""
    except ValueError:
        return ""


def _redact_url(url: str) -> str:
    """Drop any user:password@ from a URL so it can be shown."""
    if span := _slashed_userinfo(url):
        return f"{url[:span[0]]}{REDACTED}{url[span[1]:]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    if parts.username is None and parts.password is None:
        return _USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", url, count=1)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, ""))


def _mask_key_id(key_id: str) -> str:
    # Key ids identify an account but are not secret; show only the tail to tell them apart.
    return f"…{key_id[-4:]}" if len(key_id) > 8 else REDACTED
