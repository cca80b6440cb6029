"""Configuration: defaults, loading priority, validation, redaction (pure, no I/O but tmp files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from akosha_sync.config import (
    REDACTED,
    AkoshaSyncConfig,
    ConfigError,
    endpoint_identity,
    load_config,
    normalize_endpoint,
    url_identity,
)
from akosha_sync.config import sanitize_system_id as sanitize


def test_seed_defaults() -> None:
    c = AkoshaSyncConfig()
    assert (c.cloud_bucket, c.cloud_endpoint, c.cloud_region, c.system_id) == ("", "", "auto", "")
    assert c.upload_on_session_end and c.enable_fallback and c.force_method == "auto"
    assert (c.upload_timeout_seconds, c.max_retries, c.retry_backoff_seconds) == (300, 3, 2.0)
    assert c.enable_compression and c.enable_deduplication and c.chunk_size_mb == 5
    assert c.data_dir == "~/.claude/data" and c.akosha_url == "http://localhost:8682/mcp"
    assert c.reflection_db == "reflection.duckdb"
    assert c.knowledge_graph_db == "knowledge_graph.duckdb"
    assert c.validate() == []


def test_frozen() -> None:
    c = AkoshaSyncConfig()
    with pytest.raises(AttributeError):
        c.cloud_bucket = "x"  # type: ignore[misc]


def test_computed_properties() -> None:
    assert not AkoshaSyncConfig().cloud_configured
    assert not AkoshaSyncConfig().should_use_cloud
    assert AkoshaSyncConfig().should_use_http  # nothing else to use
    c = AkoshaSyncConfig(cloud_bucket="b")
    assert c.cloud_configured and c.should_use_cloud and c.should_use_http
    assert not AkoshaSyncConfig(cloud_bucket="b", enable_fallback=False).should_use_http
    forced_cloud = AkoshaSyncConfig(cloud_bucket="b", force_method="cloud")
    assert forced_cloud.should_use_cloud and not forced_cloud.should_use_http
    forced_http = AkoshaSyncConfig(cloud_bucket="b", force_method="http")
    assert not forced_http.should_use_cloud and forced_http.should_use_http


def test_five_mistakes_give_five_errors() -> None:
    c = AkoshaSyncConfig(
        upload_timeout_seconds=5,
        max_retries=11,
        retry_backoff_seconds=0.0,
        chunk_size_mb=500,
        force_method="sometimes",
    )
    errors = c.validate()
    assert len(errors) == 5, errors
    for word in ("upload_timeout_seconds", "max_retries", "retry_backoff_seconds",
                 "chunk_size_mb", "force_method"):
        assert sum(word in e for e in errors) == 1, (word, errors)
    assert any("'auto', 'cloud' or 'http'" in e for e in errors)


@pytest.mark.parametrize(
    ("field", "low", "high"),
    [("upload_timeout_seconds", 30, 3600), ("max_retries", 0, 10),
     ("retry_backoff_seconds", 0.1, 60), ("chunk_size_mb", 1, 100)],
)
def test_range_bounds_are_inclusive(field: str, low: float, high: float) -> None:
    assert AkoshaSyncConfig(**{field: low}).validate() == []
    assert AkoshaSyncConfig(**{field: high}).validate() == []


def test_system_id_resolution_and_charset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "Bobs-MacBook.local")
    assert AkoshaSyncConfig().system_id_resolved == "Bobs-MacBook-local"
    assert sanitize("a b/c..d") == "a-b-c-d"
    assert AkoshaSyncConfig(system_id="lab_01").system_id_resolved == "lab_01"
    errors = AkoshaSyncConfig(system_id="my.host").validate()
    assert len(errors) == 1 and "system_id" in errors[0] and "'my-host'" in errors[0]


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("https://acct.r2.cloudflarestorage.com", True),
        ("http://127.0.0.1:9000", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("http://minio.example.com:9000", False),
        ("http://10.0.0.5:9000", False),
        ("ftp://host", False),
        ("file:///srv/backup", True),
        ("file://relative/path", False),
        ("https://s3.example.com/", True),
        ("http://127.0.0.1:9000/akosha", False),  # the bucket is not part of the endpoint
        ("https://s3.example.com ", False),  # object_store panicked on these
        ("https://s3.example.com\n", False),
    ],
)
def test_endpoint_rules(endpoint: str, ok: bool) -> None:
    errors = AkoshaSyncConfig(cloud_bucket="bucket", cloud_endpoint=endpoint).validate()
    assert (errors == []) is ok, errors
    if not ok:
        assert "cloud_endpoint" in errors[0]


@pytest.mark.parametrize(
    ("written", "normal", "identity"),
    [
        ("", "", ""),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000", "http://127.0.0.1:9000"),
        ("HTTP://LocalHost:9000//", "http://localhost:9000", "http://localhost:9000"),
        ("https://S3.example.com:443/", "https://s3.example.com", "https://s3.example.com"),
        ("http://[::1]:8333/", "http://[::1]:8333", "http://[::1]:8333"),
        ("http://user:pw@Host:9000/", "http://user:pw@host:9000", "http://host:9000"),
        ("file:///srv//backup/", "file:///srv/backup", "file:///srv/backup"),
        ("file:///srv/../backup", "file:///srv/../backup", "file:///srv/../backup"),
        # What validate() refuses stays as written, so its error quotes it.
        ("http://127.0.0.1:9000/akosha", "http://127.0.0.1:9000/akosha",
         "http://127.0.0.1:9000/akosha"),
        ("s3.example.com", "s3.example.com", "s3.example.com"),
    ],
)
def test_an_endpoint_has_one_spelling(written: str, normal: str, identity: str) -> None:
    assert normalize_endpoint(written) == normal
    assert endpoint_identity(written) == identity
    assert AkoshaSyncConfig(cloud_endpoint=written).store_endpoint == normal


def test_an_akosha_url_has_one_spelling_and_keeps_its_path() -> None:
    assert url_identity("HTTP://User:pw@LocalHost:8682/mcp/") == "http://localhost:8682/mcp"
    assert url_identity("https://akosha.example:443/MCP") == "https://akosha.example/MCP"
    assert url_identity("not a url") == "not a url"


def test_bucket_and_credentials_rules() -> None:
    assert AkoshaSyncConfig(cloud_bucket="Bad_Bucket").validate()
    assert AkoshaSyncConfig(cloud_endpoint="https://s3.example.com").validate()  # no bucket
    errors = AkoshaSyncConfig(access_key_id="AKIA123").validate()
    assert len(errors) == 1 and "secret_access_key" in errors[0]


def test_pasted_whitespace_and_one_file_for_two_databases_are_refused() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG\n"
    errors = AkoshaSyncConfig(cloud_region="us-east-1\n", access_key_id="AKIA123 ",
                              secret_access_key=secret).validate()
    assert [e.split(" ")[0] for e in errors] == ["cloud_region", "access_key_id",
                                                 "secret_access_key"], errors
    assert not any("AKIA123" in e or "wJalr" in e for e in errors)  # keys never shown
    errors = AkoshaSyncConfig(knowledge_graph_db="reflection.duckdb").validate()
    assert len(errors) == 1 and "give each its own file name" in errors[0], errors


def test_priority_defaults_toml_env(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('cloud_bucket = "from-toml"\nmax_retries = 5\nchunk_size_mb = 8\n')
    env = {
        "AKOSHA_SYNC_CONFIG": str(toml),
        "AKOSHA_SYNC_MAX_RETRIES": "7",
        "SESSION_BUDDY_AKOSHA_MAX_RETRIES": "9",  # ours wins
        "SESSION_BUDDY_AKOSHA_SYSTEM_ID": "sb-name",  # honoured when ours is absent
        "AKOSHA_SYNC_ENABLE_COMPRESSION": "false",
        "AKOSHA_SYNC_RETRY_BACKOFF_SECONDS": "0.5",
    }
    c = load_config(environ=env)
    assert c.cloud_bucket == "from-toml"
    assert c.max_retries == 7
    assert c.chunk_size_mb == 8
    assert c.system_id == "sb-name"
    assert c.enable_compression is False
    assert c.retry_backoff_seconds == 0.5
    assert load_config(environ=env, overrides={"max_retries": 1}).max_retries == 1


def test_toml_table_form_and_missing_default_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[akosha-sync]\ncloud_bucket = "tbl"\n')
    assert load_config(toml, environ={}).cloud_bucket == "tbl"
    # The default file need not exist; an explicitly named one must.
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_loading_reports_every_bad_type_and_unknown_key(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('max_retries = "lots"\ncloud_buckett = "x"\nenable_compression = "maybe"\n')
    with pytest.raises(ConfigError) as info:
        load_config(toml, environ={"AKOSHA_SYNC_CHUNK_SIZE_MB": "big"})
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert any("did you mean 'cloud_bucket'" in p for p in problems)
    assert any("max_retries must be a whole number" in p for p in problems)
    assert any("chunk_size_mb" in p for p in problems)
    # Each names where its value came from (the variable was blamed on the file).
    assert f"max_retries must be a whole number, not 'lots' (from {toml})" in problems
    assert ("chunk_size_mb must be a whole number, not 'big' (from the environment "
            "variable AKOSHA_SYNC_CHUNK_SIZE_MB)") in problems, problems


def test_invalid_toml_is_a_clear_error(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("cloud_bucket = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(toml, environ={})


def test_aws_credentials_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEY0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-value-123")
    c = AkoshaSyncConfig()
    assert c.resolved_access_key_id == "AKIAENVKEY0000"
    assert "env-secret-value-123" in c.secrets()
    explicit = AkoshaSyncConfig(access_key_id="AKIAFILE", secret_access_key="file-secret-999")
    assert explicit.resolved_secret_access_key == "file-secret-999"


def test_redaction_everywhere() -> None:
    c = AkoshaSyncConfig(
        cloud_bucket="b",
        cloud_endpoint="https://user:endpoint-pass-77@s3.example.com",
        access_key_id="AKIAIOSFODNN7EXAMPLE",
        secret_access_key="wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY",
        akosha_token="tok-akosha-secret-1",
    )
    shown = repr(c) + str(c) + str(c.redacted())
    for secret in ("wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "tok-akosha-secret-1",
                   "endpoint-pass-77", "AKIAIOSFODNN7EXAMPLE"):
        assert secret not in shown
    assert c.redacted()["secret_access_key"] == REDACTED
    assert c.redacted()["access_key_id"].endswith("MPLE")
    # A password in a URL the parser does not take (no scheme, a mistyped one) is
    # still a password: kept out of the validation messages and the scrubber's text.
    typo = AkoshaSyncConfig(
        cloud_bucket="bucket", cloud_endpoint="key:endpoint-pass-88@127.0.0.1:9000",
        akosha_url="ht!tp://user:akosha-pass-99@/mcp",
    )
    shown = " ".join(typo.validate()) + str(typo.redacted())
    assert "endpoint-pass-88" not in shown and "akosha-pass-99" not in shown
    assert "127.0.0.1:9000" in shown  # the rest of the value is still shown
    assert {"endpoint-pass-88", "akosha-pass-99"} <= set(typo.secrets())
    # A bad value of a secret field is reported without echoing it.
    with pytest.raises(ConfigError) as info:
        load_config(environ={"AKOSHA_SYNC_HTTP_BATCH_SIZE": "x", "AKOSHA_SYNC_AKOSHA_TOKEN": "t"},
                    overrides={"secret_access_key": 12345678})
    assert "12345678" not in str(info.value)


def test_from_settings_reads_session_buddy_names() -> None:
    class Settings:
        akosha_cloud_bucket = "sb-bucket"
        akosha_max_retries = 4
        upload_timeout_seconds = 60
        unrelated = "ignored"

    c = AkoshaSyncConfig.from_settings(Settings())
    assert (c.cloud_bucket, c.max_retries, c.upload_timeout_seconds) == ("sb-bucket", 4, 60)
    assert AkoshaSyncConfig.from_settings({"cloud_region": "eu-west-1"}).cloud_region == "eu-west-1"


@pytest.mark.parametrize(
    ("endpoint", "protected"),
    [
        ("", True),  # AWS's own https endpoint
        ("https://abc.r2.cloudflarestorage.com", True),
        ("http://127.0.0.1:9000", True),
        ("http://localhost:9000", True),
        ("http://minio:9000", False),  # plain http on a network: bodies stay signed
        ("file:///srv/backup", False),
    ],
)
def test_only_tls_or_loopback_skips_hashing_request_bodies(endpoint: str, protected: bool) -> None:
    config = AkoshaSyncConfig(cloud_endpoint=endpoint, allow_plain_http=True)
    assert config.transport_protects_payload is protected


def test_a_folder_setting_that_names_a_file_is_a_problem_not_a_traceback(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    config = AkoshaSyncConfig(data_dir=str(a_file), state_dir=str(a_file / "state"),
                              log_file=str(tmp_path))
    errors = config.validate()
    assert errors == [
        f"data_dir {str(a_file)!r} is a file; point it at a folder, or move that file away.",
        f"state_dir {str(a_file / 'state')!r} cannot be a folder: {str(a_file)!r} is a file; "
        "point it at a folder, or move that file away.",
        f"log_file {str(tmp_path)!r} is a folder; name a file in it, like "
        f"'{tmp_path / 'akosha-sync.log'}'.",
    ], errors
    # status reports them instead of raising, and changes nothing.
    from akosha_sync.sync.status import local_status

    status = local_status(config)
    assert status["validation_errors"] == errors
    assert not any(d["exists"] for d in status["databases"].values())
    assert a_file.read_text() == "mine"
    assert AkoshaSyncConfig(data_dir=str(tmp_path / "not" / "yet")).validate() == []
