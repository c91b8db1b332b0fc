"""``kvstate archiver`` (run the archiver), ``kvstate archive get|search`` (read the archive) and
``kvstate archive redrive`` (put an archived operation back into the bucket).

Plugged into the ``kvstate`` command through the ``kvstate.commands`` entry-point group;
``python -m archiver`` runs the archiver too. Exit codes: 0 ok, 1 failed (not found,
PostgreSQL or NATS unreachable), 2 bad usage or configuration, or a re-drive that cannot be
done as asked (an unknown stage, nothing to run again, the operation still in the bucket).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from archiver import runtime
from archiver.errors import ArchiveUnavailable, InvalidQuery
from archiver.read import TERMINAL_STATUSES, ArchivedOperation, ArchivePage, ArchiveReader, redrive
from archiver.runtime import freeze_heap
from archiver.settings import ArchiverSettings
from archiver.worker import Archiver
from kvstate.client import Client
from kvstate.errors import (
    ConfigurationError,
    InvalidTransition,
    KvstateError,
    OperationExists,
    OperationNotFound,
    ValidationError,
)
from kvstate.settings import Settings, environ_with, redact_url

__all__ = ["main", "register", "register_archive"]

log = logging.getLogger("archiver")


def _environment(args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
    options = {"NATS_URL": "nats_url", "KVSTATE_BUCKET": "bucket", "DATABASE_URL": "database_url"}
    return environ_with(environ, {variable: getattr(args, option, None) for variable, option in options.items()})


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("asyncio").setLevel(logging.WARNING)


# ---------------------------------------------------------------- kvstate archiver


async def _run_archiver(settings: ArchiverSettings, burst: bool) -> int:
    loop = asyncio.get_running_loop()
    archiver = Archiver(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, archiver.stop)
    try:
        async with archiver:
            freeze_heap()  # connected and migrated: what exists now lives as long as the process
            counts = await archiver.run(burst=burst)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if burst:
        sys.stdout.write(json.dumps(counts.as_dict()) + "\n")
        sys.stdout.flush()
    return 0


def _cmd_archiver(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        settings = ArchiverSettings.from_env(_environment(args, environ))
    except ConfigurationError as exc:
        sys.stderr.write(f"kvstate archiver: {exc}\n")
        return 2
    _configure_logging(args.verbose)
    try:
        return runtime.run(_run_archiver(settings, args.burst))
    except KvstateError as exc:
        sys.stderr.write(f"kvstate archiver: {exc}\n")
        return 1


_ARCHIVER_HELP = "snapshot finished operations into PostgreSQL (SIGTERM stops it cleanly)"
_ARCHIVER_DESCRIPTION = (
    "Consume the bucket's changes, archive finished operations into PostgreSQL, then remove them "
    "from the bucket after ARCHIVER_GRACE_PERIOD seconds. Configured by NATS_URL, KVSTATE_BUCKET, "
    "DATABASE_URL and ARCHIVER_* (docs/archive.md)."
)


def _archiver_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--burst", action="store_true", help="archive what is pending, print the counts as JSON, exit")
    parser.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL)")
    parser.add_argument("--bucket", help="KV bucket (default: $KVSTATE_BUCKET or operations)")
    parser.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every batch")
    parser.set_defaults(handler=_cmd_archiver)


def register(subparsers: Any) -> None:
    """Add ``kvstate archiver``."""
    _archiver_arguments(subparsers.add_parser("archiver", help=_ARCHIVER_HELP, description=_ARCHIVER_DESCRIPTION))


# ---------------------------------------------------------------- kvstate archive


def _parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _parse_metadata(value: str) -> dict[str, object]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--metadata is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("--metadata must be a JSON object, for example '{\"customer\": 42}'")
    return parsed


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _print_operation(item: ArchivedOperation) -> None:
    op = item.operation
    out = sys.stdout
    out.write(f"id:         {item.id}\n")
    out.write(f"pipeline:   {item.pipeline}\n")
    out.write(
        f"status:     {item.status}" + (f" (stage {item.failed_stage} failed)" if item.failed_stage else "") + "\n"
    )
    out.write(f"created:    {item.created_at.isoformat()}\n")
    finished = item.finished_at.isoformat() if item.finished_at else "-"
    took = f" (took {item.duration:.3f}s)" if item.duration is not None else ""
    out.write(f"finished:   {finished}{took}\n")
    out.write(f"revision:   {item.revision}\n")
    out.write(f"archived:   {item.archived_at.isoformat()}\n")
    if op.cancel is not None:
        out.write(f"cancelled:  {op.cancel.reason or '-'} (by {op.cancel.by or '-'})\n")
    out.write("\n")
    for name, st in op.stages.items():
        took_stage = f"{st.duration:.3f}s" if st.duration is not None else "-"
        error = st.error.message if st.error else ""
        out.write(f"  {name:<16} {st.status.value:<10} attempt {st.attempt or '-':<3} {took_stage:>10}  {error}\n")
    if op.metadata:
        out.write("\nmetadata: " + json.dumps(op.metadata, sort_keys=True) + "\n")


def _print_page(page: ArchivePage) -> None:
    headers = ("id", "pipeline", "status", "failed stage", "finished", "duration")
    rows = [
        (
            item.id,
            item.pipeline,
            item.status,
            item.failed_stage or "-",
            item.finished_at.isoformat(timespec="seconds") if item.finished_at else "-",
            f"{item.duration:.3f}s" if item.duration is not None else "-",
        )
        for item in page.items
    ]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    sys.stdout.write("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in rows:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
    if page.next_token:
        sys.stdout.write(f"\nmore: --page-token {page.next_token}\n")


async def _redrive(args: argparse.Namespace, archive: ArchiveReader, kv: Settings) -> int:
    async with Client(kv, name="kvstate-archive-redrive") as client:
        result = await redrive(archive, client, args.id, args.stage, reason=args.reason, by=args.by)
    op = result.operation
    if args.json:
        sys.stdout.write(_json({"outcome": result.outcome.value, "operation": op}) + "\n")
        return 0
    action = op.actions[-1]
    sys.stdout.write(
        f"{result.outcome.value}: {op.id} is back in the bucket, {op.status.value} at revision {result.revision}, "
        f"running again from {', '.join(action.stages)} (re-drive {op.redrives} of archived revision "
        f"{action.archived_revision})\n"
    )
    return 0


async def _archive_command(args: argparse.Namespace, database_url: str, kv: Settings) -> int:
    async with ArchiveReader.connect(database_url) as archive:
        if args.action == "redrive":
            return await _redrive(args, archive, kv)
        if args.action == "get":
            item = await archive.get(args.id)
            if item is None:
                sys.stderr.write(f"kvstate archive: operation {args.id!r} is not in the archive\n")
                return 1
            sys.stdout.write(_json(item) + "\n") if args.json else _print_operation(item)
            return 0
        page = await archive.search(
            status=args.status,
            failed_stage=args.failed_stage,
            pipeline=args.pipeline,
            id_prefix=args.id_prefix,
            finished_after=args.since,
            finished_before=args.until,
            metadata=args.metadata,
            limit=args.limit,
            page_token=args.page_token,
        )
        if args.json:
            sys.stdout.write(_json(page) + "\n")
        else:
            _print_page(page)
        return 0


def _cmd_archive(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    try:
        settings = ArchiverSettings.from_env(_environment(args, environ))
    except ConfigurationError as exc:
        sys.stderr.write(f"kvstate archive: {exc}\n")
        return 2
    try:
        return asyncio.run(_archive_command(args, settings.database_url, settings.kv))
    except (InvalidQuery, ValidationError, InvalidTransition) as exc:
        sys.stderr.write(f"kvstate archive: {exc}\n")
        return 2
    except OperationExists as exc:
        sys.stderr.write(f"kvstate archive: {exc}: it is still in the bucket, retry it there (kvstate retry)\n")
        return 2
    except OperationNotFound as exc:
        sys.stderr.write(f"kvstate archive: {exc}\n")
        return 1
    except ArchiveUnavailable as exc:
        where = redact_url(settings.database_url)
        sys.stderr.write(f"kvstate archive: cannot read the archive at {where}: {exc}\n")
        return 1
    except KvstateError as exc:
        sys.stderr.write(f"kvstate archive: {exc}\n")
        return 1


def register_archive(subparsers: Any) -> None:
    """Add ``kvstate archive get ID``, ``kvstate archive search ...`` and ``kvstate archive redrive ID ...``."""
    parser = subparsers.add_parser("archive", help="look up finished operations in the PostgreSQL archive")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    get = actions.add_parser("get", help="one archived operation")
    get.add_argument("id")

    search = actions.add_parser("search", help="archived operations, newest finished first")
    search.add_argument("--status", action="append", choices=list(TERMINAL_STATUSES), help="repeatable")
    search.add_argument("--failed-stage", help="operations whose stage X failed")
    search.add_argument("--pipeline")
    search.add_argument("--id-prefix")
    search.add_argument("--since", type=_parse_time, help="finished at or after (ISO 8601; UTC when no offset)")
    search.add_argument("--until", type=_parse_time, help="finished before (ISO 8601; UTC when no offset)")
    search.add_argument("--metadata", type=_parse_metadata, help="JSON object the shared metadata contains")
    search.add_argument("--limit", type=int, default=20)
    search.add_argument("--page-token", help="the token printed under the previous page")

    again = actions.add_parser(
        "redrive", help="put an archived operation back into the bucket and run it again from a stage"
    )
    again.add_argument("id")
    again.add_argument("--stage", action="append", help="a stage to run again, with every stage after it (repeatable)")
    again.add_argument("--reason", required=True, help="why (recorded in the operation's actions)")
    again.add_argument("--by", default="kvstate-cli", help="who (recorded with the reason; default kvstate-cli)")
    again.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL)")
    again.add_argument("--bucket", help="KV bucket (default: $KVSTATE_BUCKET or operations)")

    for sub in (get, search, again):
        sub.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL)")
        sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        sub.set_defaults(handler=_cmd_archive)
    parser.set_defaults(handler=_cmd_archive)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``python -m archiver [--burst]``: the same as ``kvstate archiver``."""
    parser = argparse.ArgumentParser(prog="python -m archiver", description=_ARCHIVER_DESCRIPTION)
    _archiver_arguments(parser)
    args = parser.parse_args(argv)
    return _cmd_archiver(args, os.environ if environ is None else environ)
