"""The ``akosha-sync`` command line.

Imports are deferred into each command so that light commands (the session-end
hook above all) start fast.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from akosha_sync._alloc import tune_allocator
from akosha_sync._output import as_json, human_size

if TYPE_CHECKING:
    from akosha_sync.config import AkoshaSyncConfig

__all__ = ["main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool its reader left


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="akosha-sync",
        description="Ship Session-Buddy's memory databases to cloud storage or Akosha.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML configuration file (default: $AKOSHA_SYNC_CONFIG or "
        "~/.config/akosha-sync/config.toml)",
    )
    from akosha_sync import __version__

    parser.add_argument("--version", action="version", version=f"akosha-sync {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sync = sub.add_parser("sync", help="sync the databases now")
    sync.add_argument("--method", choices=["auto", "cloud", "http"], default=None,
                      help="force a method (default: the configured force_method)")
    sync.add_argument("--no-fallback", action="store_true",
                      help="do not fall back from cloud to HTTP")
    sync.add_argument("--resend", action="store_true",
                      help="send every record to Akosha's HTTP endpoint again (after Akosha "
                      "lost its data); records it still holds count as duplicates")
    sync.add_argument("--json", action="store_true", help="print the result as JSON")
    sync.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    status = sub.add_parser("status", help="show configuration, problems and last sync")
    status.add_argument("--json", action="store_true", help="print the status as JSON")

    restore = sub.add_parser(
        "restore", help="restore the databases of an upload from the bucket"
    )
    restore.add_argument("upload_id", nargs="?", default="latest", metavar="UPLOAD_ID|latest",
                         help="the upload to restore (default: the newest)")
    restore.add_argument("--system", metavar="ID", default=None,
                         help="restore another machine's upload (default: this system_id)")
    restore.add_argument("--at", metavar="TIME", default=None,
                         help="the newest upload at or before this ISO time (UTC unless it "
                         "names a zone), e.g. 2026-11-25T12:00")
    restore.add_argument("--to", metavar="DIR", default=None,
                         help="restore into this folder (default: data_dir)")
    restore.add_argument("--force", action="store_true",
                         help="replace existing databases, keeping each as NAME.bak-<time>")
    restore.add_argument("--dry-run", action="store_true",
                         help="print what would be fetched and written; change nothing")
    restore.add_argument("--json", action="store_true", help="print the result as JSON")
    restore.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    demo = sub.add_parser(
        "demo", help="sync sample databases to a local folder, no server needed"
    )
    demo.add_argument("--dir", type=Path, default=None,
                      help="where to put the sample data and the store "
                      "(default: a folder under the system temp dir)")

    from akosha_sync.server import cli as server_cli

    server_cli.add_commands(sub)
    from akosha_sync import cli_repository

    cli_repository.add_commands(sub)
    return parser


def _load(args: argparse.Namespace, **overrides: Any) -> AkoshaSyncConfig:
    from akosha_sync.config import load_config

    return load_config(args.config, overrides=overrides)


# Commands that upload large buffers (packs, parts; prune repacks): see
# akosha_sync._alloc. Not restore or verify: they hold little anyway (~100 MB), and
# re-mapping each downloaded pack costs a restore ~4 % (0.74 s against 0.71).
_MOVES_DATA = frozenset({"sync", "demo", "serve", "drain", "prune"})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from akosha_sync.config import ConfigError

    try:
        handler = {
            "sync": _cmd_sync,
            "status": _cmd_status,
            "restore": _cmd_restore,
            "demo": _cmd_demo,
        }.get(args.command)
        from akosha_sync import cli_repository

        if args.command in _MOVES_DATA:
            tune_allocator()
        if handler is not None or args.command in cli_repository.COMMANDS:
            _interrupt_on_sigterm()
        if handler is None and args.command in cli_repository.COMMANDS:
            return cli_repository.run(args)
        if handler is None:
            from akosha_sync.server import cli as server_cli

            return server_cli.run(args)
        return handler(args)
    except ConfigError as exc:
        print(f"akosha-sync: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        # A Ctrl-C may land after the manifest's PUT: the upload is then complete.
        outcome = ("; an upload is either whole (its manifest written) or discarded, never "
                   "half-written: `akosha-sync snapshots` lists the whole ones"
                   if getattr(args, "command", None) == "sync" else "")
        print(f"akosha-sync: interrupted{outcome}.", file=sys.stderr)
        return 143 if _TERMINATED else 130
    except BrokenPipeError:
        return _stdout_closed()


def _interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, ``timeout``, a service manager) ends a one-shot command as
    Ctrl-C does: its cleanup runs (a sync discards its claim and aborts its multipart
    uploads, a prune gives up its lease) instead of the process vanishing mid-way."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        global _TERMINATED
        _TERMINATED = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


_TERMINATED = False  # the KeyboardInterrupt came from SIGTERM: exit 143, as shells expect


def _stdout_closed() -> int:
    """The reader of our output left (``akosha-sync snapshots | head``): stop quietly,
    as other command-line tools do, with a shell's SIGPIPE status."""
    import os

    # Later flushes (at exit) must not raise again into a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def run() -> None:
    """The ``akosha-sync`` program: :func:`main`, then a quick exit.

    Tearing the interpreter down (every module, the object store's runtime) takes
    ~60 ms, a third of an unchanged re-sync. Once the output is flushed there is
    nothing for it to do, so the process ends at once. Threads still alive get a few
    seconds first: after an interrupt, AnyIO's idle worker threads can be left waiting
    for work that never comes, and the interpreter's own exit would wait for them
    forever (a restore stopped with SIGTERM hung after saying "interrupted").
    """
    code = main()
    import logging
    import os
    import threading

    logging.shutdown()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = _stdout_closed()
    sys.stderr.flush()
    until = time.monotonic() + _THREADS_GRACE_SECONDS
    for thread in threading.enumerate():
        # An AnyIO worker's result has no reader once main() returned: not waited for.
        if (thread is not threading.current_thread() and not thread.daemon
                and not thread.name.startswith("AnyIO worker")):
            thread.join(max(0.0, until - time.monotonic()))
    os._exit(code)


_THREADS_GRACE_SECONDS = 3.0


# ------------------------------------------------------------------ commands
def _cmd_sync(args: argparse.Namespace) -> int:
    import anyio

    from akosha_sync.logs import configure_logging
    from akosha_sync.sync.runner import run_sync

    config = _load(args)
    problems = config.validate()
    if problems:
        print("akosha-sync: the configuration has problems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config, stderr_level=None)
    progress = None if (args.quiet or args.json) else _ProgressPrinter()
    started = time.time()
    result = anyio.run(
        lambda: run_sync(
            config,
            method=args.method,
            enable_fallback=False if args.no_fallback else None,
            trigger="cli",
            progress=progress,
            resend=args.resend,
        )
    )
    if progress:
        progress.done()
    served = _serve_queued(config, args, result, started)
    if args.json:
        print(as_json(result))
    else:
        print(_describe_result(result, error_line=bool(result.get("success"))))
        if served:
            print(f"    queue:     {served} waiting session end(s) served by this sync")
    if not result.get("success"):
        print(f"akosha-sync: sync failed: {result.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from akosha_sync.sync.status import local_status

    config = _load(args)
    status = local_status(config)
    status["queued"] = _queued(config)
    from akosha_sync.server.hook import running_daemon

    status["daemon"] = running_daemon(config)
    if args.json:
        print(as_json(status))
    else:
        print(_describe_status(status))
    return EXIT_OK if not status["validation_errors"] else EXIT_CONFIG


def _serve_queued(
    config: AkoshaSyncConfig, args: argparse.Namespace, result: dict[str, Any], started: float
) -> int:
    """After a successful sync by hand, the queued requests it served too are done
    (a session end that failed while the store was down no longer shows as failed and
    syncs again at its retry time). Returns how many; a queue that cannot be written
    leaves them to their retry, which is harmless."""
    import logging
    import sqlite3

    from akosha_sync.server.queue import QUEUE_FILE, UNSET, JobQueue, Request

    if not result.get("success") or not (config.state_path / QUEUE_FILE).is_file():
        return 0
    ran = (args.method or config.force_method,
           False if args.no_fallback else config.enable_fallback)

    def covers(request: Request) -> bool:
        method = config.force_method if request.method == UNSET else request.method
        fallback = (config.enable_fallback if request.enable_fallback is None
                    else request.enable_fallback)
        return (method, fallback) == ran

    try:
        return JobQueue(config.state_path).served_by(
            result, covers=covers, trigger="cli", started_at=started, finished_at=time.time()
        )
    except (OSError, sqlite3.Error) as exc:
        logging.getLogger("akosha_sync.cli").warning(
            "the queue could not be updated; its requests sync again at their time: %s", exc)
        return 0


def _queued(config: AkoshaSyncConfig) -> list[dict[str, Any]] | str:
    """The requests waiting in the queue (a failed session end says when it retries).

    Read only if the queue exists: status never creates the state folder. A queue that
    cannot be read is described, not raised: status must still show everything else.
    """
    import sqlite3

    from akosha_sync.server.queue import QUEUE_FILE, JobQueue

    if not (config.state_path / QUEUE_FILE).is_file():
        return []
    try:
        return JobQueue(config.state_path).pending()
    except (OSError, sqlite3.Error) as exc:
        return f"the queue cannot be read: {exc}"


def _parse_time(text: str) -> Any:
    from datetime import UTC, datetime

    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    moment = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)  # 9999-12-31T23:59-05:00 is past the calendar's end
    except OverflowError as exc:
        raise ValueError(str(exc)) from exc


def _cmd_restore(args: argparse.Namespace) -> int:
    import contextlib

    import anyio
    import msgspec

    from akosha_sync.errors import CloudUploadError, SyncError
    from akosha_sync.logs import configure_logging
    from akosha_sync.repository.restore import RestoreError, RestoreResult, restore
    from akosha_sync.repository.store import make_store

    config = _load(args)
    problems = config.validate()
    if not config.cloud_configured:
        problems.append("cloud_bucket is not set: restore reads the bucket uploads went to.")
    if problems:
        print("akosha-sync: the configuration has problems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        at = _parse_time(args.at) if args.at else None
    except ValueError:
        print(f"akosha-sync: --at {args.at!r} is not an ISO time; use e.g. "
              "2026-11-25T12:00 or 2026-11-25T12:00+01:00.", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config, stderr_level=None)
    progress = None if (args.quiet or args.json) else _ProgressPrinter()
    if args.to is not None and not args.to.strip():
        print("akosha-sync: --to is empty; name the folder to restore into (--to . for "
              "the current one).", file=sys.stderr)
        return EXIT_CONFIG
    target = (Path(args.to) if args.to else config.data_path).expanduser().resolve()

    async def run() -> RestoreResult:
        async with contextlib.AsyncExitStack() as stack:
            if not args.dry_run and target == config.data_path.resolve():
                from akosha_sync.sync.state import restoring_into

                await stack.enter_async_context(restoring_into(config, target))
            return await restore(
                make_store(config), config,
                system_id=config.system_id_resolved if args.system is None else args.system,
                target=target, upload_id=args.upload_id, at=at, force=args.force,
                dry_run=args.dry_run, progress=progress,
            )

    try:
        result = anyio.run(run)
    except (RestoreError, CloudUploadError) as exc:
        if progress:
            progress.done()
        print(f"akosha-sync: restore failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except SyncError as exc:  # the upload lock: a sync kept running
        print(f"akosha-sync: restore not started: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if progress:
        progress.done()
    if args.json:
        print(as_json(msgspec.to_builtins(result)))
        return EXIT_FAILED if result.problems else EXIT_OK
    verb = "would restore" if result.dry_run else "restored"
    lines = [f"  [{'dry run' if result.dry_run else 'ok'}] {verb} upload {result.upload_id} "
             f"of {result.system_id} ({result.storage_layout} layout) into {result.target_dir}"]
    for f in result.files:
        kept = f" (existing kept as {Path(f.backup).name})" if f.backup else ""
        lines.append(f"    {f.name}: {human_size(f.size)} sha256 {f.sha256[:16]}{kept}")
    for f in result.set_aside:
        lines.append(f"    {f.name}: {'to be ' if result.dry_run else ''}set aside as "
                     f"{Path(f.backup or '').name} (the upload has no WAL; DuckDB would "
                     "replay this one into the restored database)")
    if result.dry_run:
        lines.append(f"    to download: {human_size(result.bytes_to_download)} in "
                     f"{len(result.fetch)} object(s)")
        lines.extend(f"    problem: {p}" for p in result.problems)
    else:
        lines.append(f"    downloaded: {human_size(result.bytes_downloaded)} in "
                     f"{result.duration_seconds:.2f} s")
    lines.extend(f"    note: {n}" for n in result.notes)
    print("\n".join(lines))
    return EXIT_FAILED if result.problems else EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    import anyio

    from akosha_sync.config import AkoshaSyncConfig
    from akosha_sync.logs import configure_logging
    from akosha_sync.sample import add_conversations, create_sample_databases
    from akosha_sync.sync.cloud import CloudSyncMethod

    root = (args.dir or Path(tempfile.gettempdir()) / "akosha-sync-demo").resolve()
    data = root / "claude-data"
    store = root / "store"
    fresh = not (data / "reflection.duckdb").exists()
    if fresh:
        create_sample_databases(data)
    config = AkoshaSyncConfig(
        cloud_bucket="akosha",
        cloud_endpoint=f"file://{store}",
        system_id="demo-machine",
        data_dir=str(data),
        state_dir=str(root / "state"),
        log_file=str(root / "state" / "akosha-sync.log"),
    )
    configure_logging(config, stderr_level=None)
    method = CloudSyncMethod(config)
    print(f"Demo folder: {root}")
    print(f"  sample Session-Buddy databases: {data}")
    print(f"  local 'cloud' store (file://):  {store / 'akosha'}\n")

    first = anyio.run(method.sync)
    print("First sync" if fresh else "Sync (databases from an earlier demo run)")
    print(_describe_result(first))
    if not first["success"]:
        return EXIT_FAILED
    manifest = (store / "akosha" / first["manifest_key"]).read_text(encoding="utf-8")
    print(f"\nThe manifest ({first['manifest_key']}):\n{manifest}")

    second = anyio.run(method.sync)
    print("Second sync, nothing changed: nothing is sent again")
    print(_describe_result(second))

    add_conversations(data, 3, seed=len(first["upload_id"]) + int(second["upload_id"][9:15]))
    third = anyio.run(method.sync)
    print("\nThird sync, after 3 new conversations (held in the WAL):")
    print(_describe_result(third))
    if not (second["success"] and third["success"]):
        return EXIT_FAILED
    return _demo_restore(config, root / "restored", data)


def _demo_restore(config: AkoshaSyncConfig, target: Path, data: Path) -> int:
    """The demo's last step: the newest upload read back, compared with the sources."""
    import shutil

    import anyio

    from akosha_sync.repository.restore import restore
    from akosha_sync.repository.store import make_store

    shutil.rmtree(target, ignore_errors=True)  # the demo's own folder, from a run before
    result = anyio.run(lambda: restore(make_store(config), config,
                                       system_id=config.system_id_resolved, target=target))
    same = all((target / f.name).read_bytes() == (data / f.name).read_bytes()
               for f in result.files)
    print(f"\nRestore of the newest upload ({result.upload_id}) into {target}:")
    for f in result.files:
        print(f"    {f.name}: {human_size(f.size)} sha256 {f.sha256[:16]}")
    print(f"    byte for byte the same as {data}: {'yes' if same else 'NO'}")
    print(f"\nRun it again with: akosha-sync demo --dir {target.parent}")
    return EXIT_OK if same else EXIT_FAILED


# ------------------------------------------------------------------ output
def _describe_result(result: dict[str, Any], *, error_line: bool = True) -> str:
    """The result in a few lines; ``error_line=False`` when the caller prints the error
    itself (``sync`` does, on stderr: once is enough)."""
    mark = "ok" if result.get("success") else "FAILED"
    lines = [
        " ".join(filter(None, [f"  [{mark}]", result.get("method"), "sync",
                               result.get("upload_id"),
                               f"in {result.get('duration_seconds', 0):.2f} s"])),
    ]
    uploaded = result.get("files_uploaded") or []
    if uploaded:
        lines.append(f"    sent:      {_sent_objects(uploaded)} "
                     f"({human_size(result.get('bytes_transferred', 0))})")
    if result.get("files_unchanged"):
        lines.append(f"    unchanged: {', '.join(result['files_unchanged'])} (not sent again)")
    if result.get("files_missing"):
        lines.append(f"    missing:   {', '.join(result['files_missing'])} (skipped)")
    if result.get("manifest_key"):
        lines.append(f"    manifest:  {result['manifest_key']}")
        lines.append(f"    conversations: {result.get('conversation_count', 0)}"
                     f" ({result.get('new_conversation_count') or 0} new for Akosha)")
    attempts = result.get("method_attempts") or []
    if len(attempts) > 1 or any(a["error"] for a in attempts):  # a lone success says nothing
        for attempt in attempts:
            lines.append(f"    tried {attempt['method']}: {attempt['error'] or 'ok'}")
    # One method tried: its line already is the error.
    if error_line and result.get("error") and [a["error"] for a in attempts] != [
        result["error"]
    ]:
        lines.append(f"    error:     {result['error']}")
    return "\n".join(lines)


def _sent_objects(keys: list[str]) -> str:
    """The objects a sync stored, by name; packs (named by their hash) only counted."""
    packs = sum(1 for k in keys if k.endswith(".pack"))
    names = [k.rsplit("/", 1)[-1] for k in keys if not k.endswith(".pack")]
    counted = [f"{packs} pack{'s' if packs != 1 else ''}"] if packs else []
    return ", ".join(counted + names)


def _describe_status(status: dict[str, Any]) -> str:
    lines = [
        f"system id:        {status['system_id']}",
        f"cloud configured: {status['cloud_configured']}"
        + (f" ({status['target']})" if status.get("target") else ""),
        f"methods:          cloud={status['should_use_cloud']} http={status['should_use_http']}"
        f" (force_method={status['force_method']}, fallback={status['enable_fallback']})",
    ]
    for name, info in status["databases"].items():
        if info["exists"]:
            lines.append(
                f"database:         {name}: {human_size(info['size'])}"
                + (" + WAL" if info["wal"] else "")
                + ("" if info["changed_since_last_upload"] is None else
                   ", changed since last upload" if info["changed_since_last_upload"]
                   else ", unchanged since last upload")
            )
        else:
            lines.append(f"database:         {name}: missing ({info['path']})")
    last = status.get("last_upload")
    lines.append(f"last upload:      {last['upload_id'] if last else 'none yet'}")
    for method, info in sorted(status.get("undeliverable", {}).items()):
        if info.get("count"):
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(info.get("by_kind", {}).items()))
            lines.append(f"not deliverable:  {info['count']} records via {method} ({kinds}): "
                         "no embedding")
    queued = status.get("queued")
    if isinstance(queued, str):
        lines.append(f"queued:           {queued}")
    elif queued:
        failed = [q for q in queued if q.get("failed_attempts") and not q.get("running")]
        cut = [q for q in queued if q.get("interrupted")]
        running = [q for q in queued if q.get("running") and not q.get("interrupted")]
        lines.append(f"queued:           {len(queued)} sync request(s) not yet served"
                     + (f"; {len(running)} running now" if running else "")
                     + (f"; {len(cut)} interrupted (the process running them died; the "
                        "next daemon or `akosha-sync drain` runs them)" if cut else "")
                     + (f"; {len(failed)} failed and retry at {failed[0]['retry_at']} "
                        f"(attempt {failed[0]['failed_attempts'] + 1}; last error: "
                        f"{failed[0]['last_error']}; `akosha-sync drain` runs them now)"
                        if failed else ""))
    if "daemon" in status:
        daemon = status["daemon"]
        lines.append(f"daemon:           {daemon['url']} (pid {daemon['pid']})" if daemon else
                     "daemon:           none over HTTP (hooks queue session ends and start a "
                     "one-shot drain)")
    checked = status.get("last_verification")
    lines.append(
        f"last verify:      {checked['level']} {'ok' if checked['ok'] else 'FAILED'} at "
        f"{checked['at']} ({len(checked['uploads'])} uploads, {checked['problems']} problems)"
        if checked else "last verify:      never"
    )
    if status["validation_errors"]:
        lines.append("problems:")
        lines.extend(f"  - {p}" for p in status["validation_errors"])
    else:
        lines.append("problems:         none")
    return "\n".join(lines)


class _ProgressPrinter:
    """One self-rewriting line on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.tty:
            return
        pct = f" {100 * done // total:3d}%" if total else ""
        line = f"\r  {phase}{pct} {human_size(done) if done else ''}"
        if line != self.last:
            sys.stderr.write(line.ljust(60))
            sys.stderr.flush()
            self.last = line

    def done(self) -> None:
        if self.tty and self.last:
            sys.stderr.write("\r" + " " * 62 + "\r")
            sys.stderr.flush()
