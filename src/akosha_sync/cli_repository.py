"""Command-line entries over the bucket as a repository: snapshots, verify, forget, prune.

Kept apart from cli.py so that several branches can add commands without colliding.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from akosha_sync._output import as_json, human_size

__all__ = ["COMMANDS", "add_commands", "run"]

COMMANDS = frozenset({"snapshots", "forget", "verify", "prune"})

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2


def _add_policy(parser: argparse.ArgumentParser) -> None:
    for name, unit in (("last", "uploads"), ("hourly", "hours"), ("daily", "days"),
                       ("weekly", "weeks"), ("monthly", "months"), ("yearly", "years")):
        parser.add_argument(f"--keep-{name}", type=int, default=0, metavar="N",
                            help=f"keep the newest upload of each of the last N {unit}"
                            if name != "last" else "keep the N newest uploads")
    parser.add_argument("--keep-within", default="", metavar="DURATION",
                        help="keep every upload within DURATION (e.g. 30d, 1y6m, 12h) of "
                        "the newest one")


def add_commands(sub: Any) -> None:
    snaps = sub.add_parser("snapshots", help="list the uploads in the bucket")
    which = snaps.add_mutually_exclusive_group()
    which.add_argument("--system", metavar="ID", help="another system's uploads")
    which.add_argument("--all-systems", action="store_true", help="every system's uploads")
    snaps.add_argument("--json", action="store_true", help="print JSON")

    forget = sub.add_parser("forget", help="remove uploads a retention policy does not "
                            "keep, or the uploads named")
    forget.add_argument("upload_ids", nargs="*", metavar="UPLOAD_ID",
                        help="forget exactly these uploads (e.g. damaged ones) instead of "
                        "applying a policy")
    _add_policy(forget)
    forget.add_argument("--system", metavar="ID", help="another system's uploads")
    forget.add_argument("--dry-run", action="store_true", help="only show the decisions")
    forget.add_argument("--prune", action="store_true",
                        help="then delete the data no remaining upload needs")
    forget.add_argument("--json", action="store_true", help="print JSON")

    verify = sub.add_parser("verify", help="check uploads in the bucket")
    target = verify.add_mutually_exclusive_group()
    target.add_argument("upload_id", nargs="?", default=None,
                        help="one upload (default: the newest)")
    target.add_argument("--all", action="store_true", help="every upload")
    verify.add_argument("--system", metavar="ID", help="another system's uploads")
    verify.add_argument("--read-data", nargs="?", const="100%", default=None,
                        metavar="SUBSET", help="download and hash the data: all of it, or "
                        "n/t (part n of t) or a percentage")
    verify.add_argument("--open", action="store_true",
                        help="restore into a temporary folder and check row counts with DuckDB")
    verify.add_argument("--json", action="store_true", help="print JSON")

    prune = sub.add_parser("prune", help="delete data no upload needs; repack sparse packs")
    prune.add_argument("--system", metavar="ID", help="another system's data")
    prune.add_argument("--dry-run", action="store_true", help="only show the plan")
    prune.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    from akosha_sync.config import load_config

    config = load_config(args.config)
    problems = config.validate()
    if problems:
        print("akosha-sync: the configuration has problems:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    handler = {
        "snapshots": _cmd_snapshots,
        "forget": _cmd_forget,
        "verify": _cmd_verify,
        "prune": _cmd_prune,
    }[args.command]
    import anyio

    from akosha_sync.repository.retention import RetentionError
    from akosha_sync.repository.store import Refusal
    from akosha_sync.sync.protocol import CloudUploadError

    try:
        result: int = anyio.run(handler, config, args)
    except (CloudUploadError, Refusal, RetentionError, ValueError) as exc:
        print(f"akosha-sync {args.command}: {exc}", file=sys.stderr)
        result = EXIT_FAILED if isinstance(exc, CloudUploadError | Refusal) else EXIT_CONFIG
    _exit_now(result)
    return result  # pragma: no cover - not reached


def _exit_now(code: int) -> None:
    """Leave without interpreter finalization. obstore's tokio threads may still be
    handing back their last result when Python finalizes, and the process then aborts
    (SIGABRT, measured: 18 of 30 runs of put+head+delete on obstore 0.12). Everything
    is committed in the store and printed by now."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _cmd_snapshots(config: Any, args: argparse.Namespace) -> int:
    from akosha_sync.repository.service import snapshots
    from akosha_sync.repository.snapshots import LEFTOVER

    infos = await snapshots(config, system_id=args.system, all_systems=args.all_systems)
    if args.json:
        print(as_json(infos))
        return EXIT_OK
    if not infos:
        print("no uploads in the bucket for this system")
        return EXIT_OK
    print(f"{'UPLOAD':<40} {'TIME (UTC)':<20} {'FILES':>5} {'SIZE':>9} {'NEW':>9} "
          f"{'CONV':>6}  STATE / LAST CHECK")
    for info in infos:
        check = info.last_verification
        checked = (
            f"{check['level']} {'ok' if check['ok'] else 'FAILED'} {check['at'][:16]}"
            if check else "never verified"
        )
        problem = info.problem or ""
        state = ("complete" if info.complete else problem if problem.startswith(LEFTOVER)
                 else f"INCOMPLETE ({problem})")
        databases = sorted(n for n in info.carried_over if not n.endswith(".wal"))
        if databases:  # not read, or not asked for: an earlier version is inside
            state += "".join(f", {n} as of {info.carried_over[n]}" for n in databases)
        print(
            f"{info.upload_id:<40} {info.time[:19].replace('T', ' '):<20} "
            f"{len(info.files):>5} {human_size(info.logical_size):>9} "
            f"{human_size(info.bytes_new):>9} "
            f"{'' if info.conversation_count is None else info.conversation_count:>6}  "
            f"{state}; {checked}"
        )
    return EXIT_OK


def _policy(args: argparse.Namespace) -> Any:
    from akosha_sync.repository.retention import Policy

    return Policy(
        keep_last=args.keep_last,
        keep_hourly=args.keep_hourly,
        keep_daily=args.keep_daily,
        keep_weekly=args.keep_weekly,
        keep_monthly=args.keep_monthly,
        keep_yearly=args.keep_yearly,
        keep_within=args.keep_within,
    )


async def _cmd_forget(config: Any, args: argparse.Namespace) -> int:
    from akosha_sync.repository.service import forget_uploads

    report = await forget_uploads(
        config, _policy(args), system_id=args.system, dry_run=args.dry_run,
        upload_ids=args.upload_ids,
    )
    pruned: Any = None
    prune_error: str | None = None
    if args.prune and not args.dry_run and not report.errors:
        from akosha_sync.repository.service import prune_unused
        from akosha_sync.repository.store import Refusal
        from akosha_sync.sync.protocol import CloudUploadError

        try:
            pruned = await prune_unused(config, system_id=args.system, dry_run=False,
                                        progress=_PruneNotice())
        except (CloudUploadError, Refusal) as exc:
            # The forget is done either way: it is reported, then the prune's failure.
            prune_error = str(exc)
    if args.json:
        print(as_json(
            {"forget": report, "prune": pruned, "prune_error": prune_error}
            if args.prune else report
        ))
    else:
        verb = "would forget" if args.dry_run else "forgot"
        for decision in report.decisions:
            mark = "keep  " if decision.keep else "forget"
            print(f"{mark} {decision.upload_id:<40} {decision.time[:19]}  "
                  f"{'; '.join(decision.reasons)}")
        then = ("" if args.prune and not args.dry_run and not report.errors
                else "; shared data is removed by `akosha-sync prune`")
        print(f"{verb} {len(report.forgotten)} of {len(report.decisions)} uploads "
              f"({report.policy}){then}")
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        if pruned is not None:
            _print_prune(pruned)
        if prune_error is not None:
            print(f"akosha-sync forget: the forget is done, the prune failed: {prune_error}",
                  file=sys.stderr)
    failed = (bool(report.errors) or prune_error is not None
              or bool(pruned is not None and pruned.errors))
    return EXIT_FAILED if failed else EXIT_OK


async def _cmd_verify(config: Any, args: argparse.Namespace) -> int:
    from akosha_sync.repository.service import verify_uploads

    report = await verify_uploads(
        config,
        upload_id=args.upload_id,
        all_uploads=args.all,
        system_id=args.system,
        read_data=args.read_data,
        open_databases=args.open,
    )
    if args.json:
        print(as_json(report))
    else:
        for upload in report.uploads:
            print(f"{'ok    ' if upload.ok else 'FAILED'} {upload.upload_id} "
                  f"({upload.objects_checked} objects, {upload.pieces_read} pieces read)")
            for problem in upload.problems:
                print(f"  - {problem}")
        count, problems = len(report.uploads), report.problem_count
        print(f"verify {report.level}: {count} upload{'s' if count != 1 else ''}, "
              f"{problems} problem{'s' if problems != 1 else ''}")
    return EXIT_OK if report.ok else EXIT_FAILED


_LISTED = 20  # keys a plain dry run names; --json lists every one


def _print_prune(report: Any) -> None:
    if report.dry_run:  # the new packs of a repack are only known once it is written
        from akosha_sync.repository.format import pack_id_from_key

        repacked = set(report.repacked)
        # A repacked pack is deleted too, once its live pieces are copied: listed once.
        plain = [k for k in report.deleted if pack_id_from_key(k) not in repacked]
        for key in plain[:_LISTED]:
            print(f"  delete {key}")
        for pid in report.repacked[:_LISTED]:
            print(f"  repack pack {pid} (its live pieces into a new pack, then delete it)")
        if len(plain) > _LISTED or len(report.repacked) > _LISTED:
            print("  ... and more (--json lists them all)")
        if report.waited_for:
            print(f"  would first wait for uploads in flight: {', '.join(report.waited_for)}")
        done = (f"would delete {len(report.deleted)} objects "
                f"({human_size(report.bytes_freed)}); would repack {len(report.repacked)} packs")
    else:
        done = (f"deleted {len(report.deleted)} objects ({human_size(report.bytes_freed)}); "
                f"repacked {len(report.repacked)} packs into {len(report.new_packs)}")
    print(f"prune: {done}")
    for note in report.notes:
        print(f"  note: {note}")
    for error in report.errors:
        print(f"  error: {error}", file=sys.stderr)


class _PruneNotice:
    """Says once, on stderr, that prune is waiting and why (it may wait 15 minutes)."""

    def __init__(self) -> None:
        self._said = False

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != "prune:wait" or self._said:
            return
        self._said = True
        from akosha_sync.repository.prune import WAIT_SECONDS, in_flight_rule

        print(f"prune: waiting for {total} upload(s) that claimed before the deletion plan "
              f"to commit or fail (a sync still running, or a killed one: {in_flight_rule()}"
              f"), for up to {WAIT_SECONDS / 60:g} minutes. Interrupting is safe: nothing is "
              "deleted before the wait ends.",
              file=sys.stderr, flush=True)


async def _cmd_prune(config: Any, args: argparse.Namespace) -> int:
    from akosha_sync.repository.service import prune_unused

    report = await prune_unused(config, system_id=args.system, dry_run=args.dry_run,
                                progress=_PruneNotice())
    if args.json:
        print(as_json(report))
    else:
        _print_prune(report)
    return EXIT_FAILED if report.errors else EXIT_OK
