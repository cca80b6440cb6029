"""The repository MCP tools through the SDK's real client, against real SeaweedFS."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from minio import Minio

from akosha_sync.config import AkoshaSyncConfig
from akosha_sync.sample import SampleInfo, add_conversations
from akosha_sync.server.app import build_mcp_server
from akosha_sync.server.daemon import SyncDaemon
from support.faults import objects, restore_problems
from support.verify import manifests

MakeConfig = Callable[..., AkoshaSyncConfig]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Progress:
    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None, str | None]] = []

    async def __call__(self, done: float, total: float | None, message: str | None) -> None:
        self.seen.append((done, total, message))


async def _call(client: Client, name: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    result = await client.call_tool(name, args, **kw)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content


@pytest.mark.anyio
async def test_every_tool_carries_annotations(s3_config: MakeConfig) -> None:
    daemon = SyncDaemon(s3_config())
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        tools = {t.name: t.annotations for t in (await client.list_tools()).tools}
    assert set(tools) == {"sync_to_akosha", "akosha_sync_status", "akosha_list_snapshots",
                          "akosha_verify", "akosha_restore", "akosha_forget", "akosha_prune"}
    hints = {name: (a.read_only_hint, a.destructive_hint, a.open_world_hint)
             for name, a in tools.items() if a is not None}
    assert hints == {
        "sync_to_akosha": (False, False, True),
        "akosha_sync_status": (True, False, False),
        "akosha_list_snapshots": (True, False, True),
        "akosha_verify": (False, False, True),  # it writes the local check record
        "akosha_restore": (False, True, True),
        "akosha_forget": (False, True, True),
        "akosha_prune": (False, True, True),
    }


@pytest.mark.anyio
async def test_list_verify_and_forget_tools(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    daemon = SyncDaemon(s3_config())
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        first = await _call(client, "sync_to_akosha", {})
        add_conversations(sample.data_dir, 2, seed=9, checkpoint=True)
        second = await _call(client, "sync_to_akosha", {})
        listed = await _call(client, "akosha_list_snapshots", {})
        assert [s["upload_id"] for s in listed["snapshots"]] == [first["upload_id"],
                                                                 second["upload_id"]]
        assert listed["snapshots"][1]["complete"] is True
        assert (await _call(client, "akosha_list_snapshots", {"limit": 1}))["count"] == 1
        every = await _call(client, "akosha_list_snapshots", {"all_systems": True})
        assert every["system_id"] == "all"
        assert {(s["system_id"], s["upload_id"]) for s in every["snapshots"]} == {
            ("test-host", first["upload_id"]), ("test-host", second["upload_id"])}

        progress = _Progress()
        report = await _call(client, "akosha_verify", {"level": "open"},
                             progress_callback=progress)
        assert report["ok"] is True and report["level"] == "structure+read-data+open"
        assert report["uploads"][0]["upload_id"] == second["upload_id"]
        assert any(m and m.startswith("verify") for _, _, m in progress.seen)
        both = await client.call_tool("akosha_verify", {"upload_id": first["upload_id"],
                                                        "all_uploads": True})
        assert both.is_error and "not both" in both.content[0].text  # type: ignore[union-attr]

        plan = await _call(client, "akosha_forget", {"keep_last": 1})
        assert plan["dry_run"] is True and plan["forgotten"] == [first["upload_id"]]
        assert len(manifests(minio_client, s3_bucket)) == 2
        empty = await client.call_tool("akosha_forget", {})
        assert empty.is_error and "empty policy" in empty.content[0].text  # type: ignore[union-attr]
        # Named as this tool's arguments, not the command line's flags.
        assert "keep_last, keep_hourly" in empty.content[0].text  # type: ignore[union-attr]
        assert "--" not in empty.content[0].text  # type: ignore[union-attr]
        # A misspelt argument is refused, not dropped: "system" would have meant this
        # machine's uploads, and they would have been forgotten.
        typo = await client.call_tool("akosha_forget", {"keep_last": 1, "dry_run": False,
                                                        "system": "another-host"})
        assert typo.is_error, typo.content
        assert "takes no argument 'system'" in typo.content[0].text  # type: ignore[union-attr]
        assert "system_id" in typo.content[0].text  # type: ignore[union-attr]
        assert len(manifests(minio_client, s3_bucket)) == 2
        named = await _call(client, "akosha_forget", {"upload_ids": [first["upload_id"]]})
        assert named["dry_run"] is True and named["forgotten"] == [first["upload_id"]]
        done = await _call(client, "akosha_forget", {"keep_last": 1, "dry_run": False})
        assert done["forgotten"] == [first["upload_id"]]
        assert [m.split("/")[3] for m in manifests(minio_client, s3_bucket)] == [
            second["upload_id"]]


@pytest.mark.anyio
async def test_prune_tool_plans_then_deletes_only_what_no_upload_needs(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    daemon = SyncDaemon(s3_config())
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        first = await _call(client, "sync_to_akosha", {})
        add_conversations(sample.data_dir, 3, seed=11, checkpoint=True)
        await _call(client, "sync_to_akosha", {})
        await _call(client, "akosha_forget", {"keep_last": 1, "dry_run": False})
        # Garbage a stranger can name: a pack no index lists, a forgotten upload's file.
        stray_pack = f"systems/test-host/packs/cd/{'cd' * 32}.pack"
        stray = f"systems/test-host/uploads/{first['upload_id']}/left-behind.duckdb"
        for key in (stray_pack, stray):
            minio_client.put_object(s3_bucket, key, io.BytesIO(b"junk"), 4)
        before = set(objects(minio_client, s3_bucket))

        too_long = await client.call_tool("akosha_prune", {"wait_seconds": 3600})
        assert too_long.is_error and "wait_seconds" in too_long.content[0].text  # type: ignore[union-attr]
        plan = await _call(client, "akosha_prune", {})
        assert plan["dry_run"] is True and {stray_pack, stray} <= set(plan["deleted"])
        assert set(objects(minio_client, s3_bucket)) == before  # the plan deleted nothing

        progress = _Progress()
        done = await _call(client, "akosha_prune", {"dry_run": False},
                           progress_callback=progress)
        assert done["errors"] == [] and set(done["deleted"]) == set(plan["deleted"])
        after = set(objects(minio_client, s3_bucket))
        assert not (after & set(done["deleted"])) and not any("/locks/" in k for k in after)
        assert any(m and m.startswith("prune") for _, _, m in progress.seen)
    # What is left restores, read back with minio.
    assert restore_problems(minio_client, s3_bucket) == []
    assert len(manifests(minio_client, s3_bucket)) == 1


@pytest.mark.anyio
async def test_restore_tool_plans_then_restores_with_the_token(
    s3_config: MakeConfig, sample: SampleInfo,
) -> None:
    daemon = SyncDaemon(s3_config())
    db = sample.reflection_path
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        synced = await _call(client, "sync_to_akosha", {})
        add_conversations(sample.data_dir, 4, seed=21, checkpoint=True)
        changed = _sha(db)

        answer = await _call(client, "akosha_restore", {})
        assert answer["confirmed"] is False and answer["confirm_token"]
        plan = answer["plan"]
        assert plan["upload_id"] == synced["upload_id"] and plan["problems"] == []
        by_name = {f["name"]: f for f in plan["files"]}
        assert by_name["reflection.duckdb"]["path"] == str(db)
        assert by_name["reflection.duckdb"]["replaces"] is True
        backup = by_name["reflection.duckdb"]["backup"]
        assert backup.startswith(f"{db}.bak-")
        assert _sha(db) == changed  # the plan wrote nothing

        wrong = await client.call_tool("akosha_restore", {"confirm_token": "nope"})
        assert wrong.is_error and "confirm_token" in wrong.content[0].text  # type: ignore[union-attr]
        other = await client.call_tool(
            "akosha_restore", {"confirm_token": answer["confirm_token"], "to": "/tmp/x"})
        assert other.is_error  # a token is for the arguments it was issued for
        assert _sha(db) == changed

        again = await _call(client, "akosha_restore", {})
        progress = _Progress()
        done = await _call(client, "akosha_restore", {"confirm_token": again["confirm_token"]},
                           progress_callback=progress)
        assert done["confirmed"] is True
        assert done["result"]["upload_id"] == synced["upload_id"]
        assert _sha(db) == by_name["reflection.duckdb"]["sha256"] != changed
        backups = sorted(db.parent.glob("reflection.duckdb.bak-*"))
        assert backups and _sha(backups[-1]) == changed
        assert progress.seen and any(m and m.startswith("restore") for _, _, m in progress.seen)
        reused = await client.call_tool("akosha_restore",
                                        {"confirm_token": again["confirm_token"]})
        assert reused.is_error  # one use only
        # A target that cannot be written is in the plan, before anything is confirmed.
        a_file = db.parent / "not-a-folder"
        a_file.write_text("kept")
        blocked = await _call(client, "akosha_restore", {"to": str(a_file)})
        assert any("is a file, not a folder" in p for p in blocked["plan"]["problems"]), blocked
        assert a_file.read_text() == "kept"
        # Relative to what? The daemon's working folder is nobody's guess: refused.
        relative = await client.call_tool("akosha_restore", {"to": "restored"})
        assert relative.is_error and "absolute" in relative.content[0].text  # type: ignore[union-attr]
        bad_id = await client.call_tool("akosha_restore", {"upload_id": "../x"})
        assert bad_id.is_error and "not an upload id" in bad_id.content[0].text  # type: ignore[union-attr]


@pytest.mark.anyio
async def test_daemon_applies_the_configured_retention_after_a_successful_sync(
    s3_config: MakeConfig, minio_client: Minio, s3_bucket: str, sample: SampleInfo,
) -> None:
    daemon = SyncDaemon(s3_config(retention_keep_last=2))
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        ids = []
        for seed in range(3):
            add_conversations(sample.data_dir, 1, seed=40 + seed, checkpoint=True)
            ids.append((await _call(client, "sync_to_akosha", {}))["upload_id"])
        # The hook runs after the waiters got their result: poll the bucket for it.
        import anyio

        with anyio.fail_after(30):
            while len(manifests(minio_client, s3_bucket)) != 2:  # noqa: ASYNC110 - the bucket sends no event
                await anyio.sleep(0.05)
    assert {m.split("/")[3] for m in manifests(minio_client, s3_bucket)} == set(ids[1:])


def test_retention_settings_are_validated(make_config: MakeConfig) -> None:
    assert make_config(retention_keep_daily=7, retention_keep_within="30d").validate() == []
    problems = make_config(retention_keep_last=-1, retention_keep_within="a month").validate()
    assert any("retention_keep_last is -1" in p for p in problems)
    assert any("retention_keep_within 'a month' is not a duration" in p for p in problems)


def test_library_messages_are_put_in_the_tools_terms() -> None:
    from akosha_sync.server.repository_tools import in_tool_terms

    assert in_tool_terms(
        "no upload at or before X; its oldest is U. Pick a later --at, or see them all with "
        "`akosha-sync snapshots --system old-laptop`."
    ) == ("no upload at or before X; its oldest is U. Pick a later `at`, or see them all "
          "with akosha_list_snapshots(system_id=old-laptop).")
    assert in_tool_terms("/x is a file, not a folder; restore --to a folder (it is created).") \
        == "/x is a file, not a folder; restore into a folder (it is created)."
    assert in_tool_terms("restore one with --system ID (e.g. --system laptop).") == (
        "restore one with system_id (e.g. system_id=laptop).")
    assert in_tool_terms("pick an earlier one (`akosha-sync verify --all` shows which)") == (
        "pick an earlier one (akosha_verify(all_uploads=true) shows which)")


@pytest.mark.anyio
async def test_a_restore_whose_plan_changed_is_offered_again_not_done(
    s3_config: MakeConfig, sample: SampleInfo, tmp_path: Path,
) -> None:
    daemon = SyncDaemon(s3_config())
    target = str(tmp_path / "restored")
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        await _call(client, "sync_to_akosha", {})
        first = await _call(client, "akosha_restore", {"to": target})
        add_conversations(sample.data_dir, 2, seed=5, checkpoint=True)
        newer = await _call(client, "sync_to_akosha", {})
        again = await _call(client, "akosha_restore",
                            {"to": target, "confirm_token": first["confirm_token"]})
        assert again["confirmed"] is False and "plan changed" in again["plan_changed"]
        assert again["plan"]["upload_id"] == newer["upload_id"] != first["plan"]["upload_id"]
        assert not (tmp_path / "restored").exists()  # nothing was restored
        done = await _call(client, "akosha_restore",
                           {"to": target, "confirm_token": again["confirm_token"]})
        assert done["confirmed"] is True and done["result"]["upload_id"] == newer["upload_id"]
    assert _sha(tmp_path / "restored" / "reflection.duckdb") == _sha(sample.reflection_path)


@pytest.mark.anyio
async def test_restore_tool_into_data_dir_waits_for_the_running_sync(
    s3_config: MakeConfig, sample: SampleInfo,
) -> None:
    """A sync holds the upload lock (here another process's, held by the test): the
    restore into data_dir does not replace the databases under it; it waits, and says so
    when the sync outlasts its wait (1 s here). Before, it went ahead, and in the daemon
    its lock probe even dropped the lock of the daemon's own sync's DuckDB."""
    import fcntl
    import os

    import msgspec

    from akosha_sync.sync.cloud import CloudSyncMethod

    config = s3_config(export_memories=False)
    assert (await CloudSyncMethod(config).sync())["success"]
    daemon = SyncDaemon(msgspec.structs.replace(config, upload_timeout_seconds=1))
    async with daemon.running(), Client(build_mcp_server(daemon)) as client:
        add_conversations(sample.data_dir, 2, seed=22, checkpoint=True)
        changed = _sha(sample.reflection_path)
        answer = await _call(client, "akosha_restore", {})
        fd = os.open(config.state_path / "sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a sync is running
            held = await client.call_tool(
                "akosha_restore", {"confirm_token": answer["confirm_token"]})
        finally:
            os.close(fd)
        assert held.is_error
        assert "uploading" in held.content[0].text  # type: ignore[union-attr]
        assert _sha(sample.reflection_path) == changed
        assert not list(sample.data_dir.glob("*.bak-*"))

