"""The ``kvstate`` command.

Built-in subcommands inspect and manage the bucket. Other packages add theirs through
the ``kvstate.commands`` entry-point group (the way Flower adds ``celery flower``): each
entry point names a subcommand and points at ``register(subparsers)``, which adds a
parser whose ``handler(args, environ) -> int`` default runs it. ``kvstate`` never imports
those packages; a client-only install simply lacks their subcommands and says which
extra to install.

Exit codes: 0 success, 1 the command ran and failed (not found, conflict, ...), 2 bad
usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, TextIO

import msgspec

from kvstate.client import Client, Revision
from kvstate.errors import (
    BucketError,
    ConfigurationError,
    KvstateError,
    OperationNotFound,
    ServerVersionError,
    ValidationError,
)
from kvstate.model import Operation, OpStatus
from kvstate.pipeline import Pipeline
from kvstate.service import QUEUE_GROUP, WriteService
from kvstate.settings import Settings, environ_with
from kvstate.watch import Change

__all__ = ["ENTRY_POINT_GROUP", "build_parser", "main"]

ENTRY_POINT_GROUP = "kvstate.commands"
_EXTRA_FOR = {"archiver": "archiver", "archive": "archiver", "dashboard": "dashboard", "demo": "demo", "up": "dev"}
_SERVER_PACKAGES = frozenset({"archiver", "dashboard", "demo", "devstack"})

Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _to_builtins(value: object) -> Any:
    return msgspec.to_builtins(value)


def _print_json(data: object, out: TextIO) -> None:
    out.write(json.dumps(_to_builtins(data), indent=2, default=_json_default) + "\n")


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = max(0.0, (now - when).total_seconds())
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _table(rows: Sequence[Sequence[str]], headers: Sequence[str], out: TextIO) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    out.write("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip() + "\n")
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _operation_text(op: Operation, out: TextIO) -> None:
    now = datetime.now(UTC)
    out.write(f"id:        {op.id}\n")
    out.write(f"pipeline:  {op.pipeline}\n")
    out.write(f"status:    {op.status.value}\n")
    out.write(f"revision:  {op.revision}\n")
    out.write(f"created:   {op.created_at.isoformat()} ({_age(op.created_at, now)} ago)\n")
    if op.finished_at:
        out.write(f"finished:  {op.finished_at.isoformat()} (took {op.duration:.3f}s)\n")
    if op.cancel:
        out.write(f"cancelled: {op.cancel.reason or '-'} (by {op.cancel.by or '-'})\n")
    out.write("\n")
    rows = []
    for name, st in op.stages.items():
        took = (
            f"{st.duration:.3f}s"
            if st.duration is not None
            else (_age(st.started_at, now) + "…" if st.started_at else "-")
        )
        rows.append(
            [
                name,
                st.status.value,
                str(st.attempt or "-"),
                st.worker or "-",
                took,
                st.error.message if st.error else "",
            ]
        )
    _table(rows, ["stage", "status", "attempt", "worker", "time", "error"], out)
    if op.metadata:
        out.write("\nmetadata: " + json.dumps(op.metadata, sort_keys=True) + "\n")


async def _with_client(
    environ: Mapping[str, str], args: argparse.Namespace, body: Callable[[Client], Awaitable[int]], create: bool = False
) -> int:
    settings = _settings(environ, args)
    async with Client(settings, create_bucket=create, name="kvstate-cli") as client:
        return await body(client)


def _settings(environ: Mapping[str, str], args: argparse.Namespace) -> Settings:
    options = {"NATS_URL": getattr(args, "nats_url", None), "KVSTATE_BUCKET": getattr(args, "bucket", None)}
    return Settings.from_env(environ_with(environ, options))


# ---------------------------------------------------------------- built-in commands


def _cmd_bucket(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        info = await client.bucket_info()
        data = {
            "bucket": info.bucket,
            "stream": info.stream,
            "storage": info.storage,
            "replicas": info.replicas,
            "history": info.history,
            "max_value_size": info.max_value_size,
            "direct_get": info.direct_get,
            "msg_ttl": info.msg_ttl,
            "messages": info.values,
            "bytes": info.bytes,
            "last_revision": info.last_revision,
        }
        if args.json:
            _print_json(data, sys.stdout)
        else:
            if args.action == "init":
                sys.stdout.write(f"bucket {client.settings.bucket!r} ready\n")
            for name, value in data.items():
                sys.stdout.write(f"{name + ':':16}{value}\n")
        return 0

    deadline = time.monotonic() + args.wait
    delay = 0.5
    while True:
        try:
            return asyncio.run(_with_client(environ, args, body, create=args.action == "init"))
        except (BucketError, ConfigurationError, ServerVersionError, ValidationError):
            raise  # a wrong setting or a bucket kvstate cannot use: waiting changes nothing
        except KvstateError as exc:  # NATS not up yet, JetStream not ready, a cluster still forming
            if time.monotonic() + delay > deadline:
                raise
            sys.stderr.write(f"kvstate: {exc}; retrying in {delay:g}s\n")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _cmd_pipeline(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    new: Pipeline | None = None
    if args.action == "set":
        path = Path(args.file)
        text = path.read_text()
        new = Pipeline.from_toml(text + "\n") if path.suffix == ".toml" else Pipeline.from_dict(json.loads(text))

    async def body(client: Client) -> int:
        if new is not None:
            revision = await client.set_pipeline(new)
            sys.stdout.write(f"pipeline {new.name!r} stored at revision {revision}\n")
            return 0
        pipelines = [await client.pipeline(args.name)] if args.name else await client.pipelines()
        if args.json:
            _print_json(pipelines, sys.stdout)
            return 0
        for pipeline in pipelines:
            sys.stdout.write(f"pipeline {pipeline.name} (heartbeat timeout {pipeline.heartbeat_timeout:g}s)\n")
            sys.stdout.write(
                "  "
                + "  ->  ".join(
                    "{" + ", ".join(layer) + "}" if len(layer) > 1 else layer[0] for layer in pipeline.layers()
                )
                + "\n"
            )
            rows = [
                [
                    s.name,
                    ", ".join(s.after) or "-",
                    "yes" if s.optional else "no",
                    str(s.max_attempts),
                    f"{s.deadline:g}s" if s.deadline else "-",
                ]
                for s in pipeline.stages
            ]
            _table(rows, ["stage", "after", "optional", "attempts", "deadline"], sys.stdout)
        if not pipelines:
            sys.stdout.write("no pipelines stored (kvstate pipeline set FILE)\n")
        return 0

    return asyncio.run(_with_client(environ, args, body))


def _cmd_create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        metadata = json.loads(args.metadata) if args.metadata else None
        op = await client.create(args.pipeline, op_id=args.id, metadata=metadata)
        if args.json:
            _print_json(op, sys.stdout)
        else:
            sys.stdout.write(op.id + "\n")
        return 0

    return asyncio.run(_with_client(environ, args, body))


def _cmd_get(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        op = await client.get(args.id)
        if args.json:
            _print_json(op, sys.stdout)
        else:
            _operation_text(op, sys.stdout)
        return 0

    return asyncio.run(_with_client(environ, args, body))


def _cmd_ls(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        ops = await client.list(status=args.status or None, stage=args.stage, pipeline=args.pipeline, limit=args.limit)
        if args.json:
            _print_json(ops, sys.stdout)
            return 0
        now = datetime.now(UTC)
        rows = [
            [
                op.id,
                op.pipeline,
                op.status.value,
                ",".join(op.active_stages) or "-",
                _age(op.created_at, now),
                str(op.revision),
            ]
            for op in ops
        ]
        _table(rows, ["id", "pipeline", "status", "active", "age", "revision"], sys.stdout)
        return 0

    return asyncio.run(_with_client(environ, args, body))


def _cmd_history(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        revisions = await client.history(args.id)
        if args.json:
            _print_json([_revision_dict(r) for r in revisions], sys.stdout)
            return 0
        rows = []
        previous: Operation | None = None
        for rev in revisions:
            when = rev.created.isoformat() if rev.created else "-"
            if rev.deleted:
                rows.append([str(rev.revision), when, "(removed)", "-", "-"])
            elif rev.operation is None:
                rows.append([str(rev.revision), when, "(corrupt)", "-", str(rev.error)])
            else:
                op = rev.operation
                since = previous.updated_at if previous is not None else None
                added = [t for t in op.history if since is None or t.at > since]
                change = "; ".join(f"{t.stage or 'operation'}: {t.from_ or '-'} -> {t.to}" for t in added)
                active = ",".join(op.active_stages) or "-"
                rows.append([str(rev.revision), when, op.status.value, active, change or "-"])
                previous = op
        _table(rows, ["revision", "written", "status", "active", "transitions"], sys.stdout)
        return 0

    return asyncio.run(_with_client(environ, args, body))


def _revision_dict(rev: Revision) -> dict[str, object]:
    return {
        "revision": rev.revision,
        "created": rev.created,
        "deleted": rev.deleted,
        "error": str(rev.error) if rev.error else None,
        "operation": rev.operation,
    }


def _cmd_watch(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        seen = 0
        async with client.watch(args.id, include_existing=not args.new_only) as changes:
            async for change in changes:
                _print_change(change, args.json)
                seen += 1
                if args.count and seen >= args.count:
                    break
        return 0

    try:
        return asyncio.run(_with_client(environ, args, body))
    except KeyboardInterrupt:
        return 0


def _print_change(change: Change, as_json: bool) -> None:
    if as_json:
        data = {
            "op_id": change.op_id,
            "revision": change.revision,
            "deleted": change.deleted,
            "operation": change.operation,
        }
        sys.stdout.write(json.dumps(_to_builtins(data), default=_json_default) + "\n")
    elif change.deleted:
        sys.stdout.write(f"{change.revision:>8}  {change.op_id}  removed\n")
    elif change.operation is not None:
        op = change.operation
        sys.stdout.write(f"{change.revision:>8}  {op.id}  {op.status.value:<10} {','.join(op.active_stages) or '-'}\n")
    sys.stdout.flush()


def _cmd_cancel(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        result = await client.cancel(args.id, reason=args.reason, by="kvstate-cli")
        sys.stdout.write(
            f"{result.outcome.value}: {result.operation.status.value} at revision {result.revision}"
            + (f" ({result.reason})" if result.reason else "")
            + "\n"
        )
        return 0 if result.applied else 1

    return asyncio.run(_with_client(environ, args, body))


def _cmd_serve(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with WriteService(client) as service:
            subjects = " ".join(service.subjects)
            sys.stderr.write(f"kvstate serve: answering {subjects} (queue group {QUEUE_GROUP})\n")
            await stop.wait()
        sys.stderr.write(f"kvstate serve: stopped; replies {json.dumps(service.replies, sort_keys=True)}\n")
        return 0

    return asyncio.run(_with_client(environ, args, body))


# ---------------------------------------------------------------- parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="NATS server URL (default: $NATS_URL or nats://127.0.0.1:4222)")
    parser.add_argument("--bucket", help="KV bucket (default: $KVSTATE_BUCKET or operations)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def _missing_extra(name: str, error: Exception) -> Handler:
    extra = _EXTRA_FOR.get(name, name)
    package = getattr(error, "name", None) or ""
    if package.split(".")[0] in _SERVER_PACKAGES:
        # the component itself is absent: the client wheel does not ship it (README "Packaging")
        advice = (
            "the server components are not part of the kvstate wheel; run them from the container image "
            f"or a checkout (pip install -e '.[{extra}]')"
        )
    else:
        advice = f"install its dependencies with pip install -e '.[{extra}]' in a checkout"

    def handler(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        sys.stderr.write(f"kvstate {name}: not available in this install ({error}); {advice}\n")
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with built-in and plugged-in subcommands."""
    parser = argparse.ArgumentParser(prog="kvstate", description="Live state of pipeline operations in NATS KV.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("bucket", help="create or inspect the bucket")
    p.add_argument("action", choices=["init", "info"])
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="retry while NATS or JetStream is not ready yet, for up to SECONDS (for start-up ordering)",
    )
    _common(p)
    p.set_defaults(handler=_cmd_bucket)

    p = sub.add_parser("pipeline", help="show or store pipeline definitions")
    p.add_argument("action", choices=["show", "set"])
    p.add_argument("name", nargs="?", help="pipeline name (show) or TOML/JSON file (set)")
    _common(p)
    p.set_defaults(handler=_cmd_pipeline)

    p = sub.add_parser("create", help="create an operation")
    p.add_argument("pipeline")
    p.add_argument("--id", help="operation id (default: a new ULID)")
    p.add_argument("--metadata", help="initial shared metadata, a JSON object")
    _common(p)
    p.set_defaults(handler=_cmd_create)

    p = sub.add_parser("get", help="show one operation")
    p.add_argument("id")
    _common(p)
    p.set_defaults(handler=_cmd_get)

    p = sub.add_parser("ls", help="list operations in the bucket")
    p.add_argument(
        "--status", action="append", choices=[s.value for s in OpStatus], help="filter by status (repeatable)"
    )
    p.add_argument("--stage", help="only operations with this stage running or retrying")
    p.add_argument("--pipeline", help="only operations of this pipeline")
    p.add_argument("--limit", type=int)
    _common(p)
    p.set_defaults(handler=_cmd_ls)

    p = sub.add_parser("history", help="KV revisions of one operation")
    p.add_argument("id")
    _common(p)
    p.set_defaults(handler=_cmd_history)

    p = sub.add_parser("watch", help="print changes as they happen (Ctrl-C stops)")
    p.add_argument("id", nargs="?")
    p.add_argument("--new-only", action="store_true", help="skip the current state, print new changes only")
    p.add_argument("--count", type=int, help="stop after this many changes")
    _common(p)
    p.set_defaults(handler=_cmd_watch)

    p = sub.add_parser("cancel", help="cancel a running operation")
    p.add_argument("id")
    p.add_argument("--reason")
    _common(p)
    p.set_defaults(handler=_cmd_cancel)

    p = sub.add_parser(
        "serve", help="answer write requests from any NATS client (kvstate.<bucket>.apply.<id>; run several)"
    )
    _common(p)
    p.set_defaults(handler=_cmd_serve)

    from kvstate.cli_actions import register as register_actions  # it imports this module's helpers

    register_actions(sub)  # kvstate retry, kvstate jobs

    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
            register(sub)
        except ImportError as exc:  # the plug-in's extra is not installed
            extra = _EXTRA_FOR.get(ep.name, ep.name)
            missing = sub.add_parser(
                ep.name, help=f"(needs the server components: pip install -e '.[{extra}]' in a checkout)"
            )
            missing.set_defaults(handler=_missing_extra(ep.name, exc))
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    handler: Handler = args.handler
    if args.command == "pipeline" and args.action == "set":
        if not args.name:
            parser.error("pipeline set needs a FILE")
        args.file = args.name
    env = os.environ if environ is None else environ
    try:
        return handler(args, env)
    except (ConfigurationError, ValidationError) as exc:
        sys.stderr.write(f"kvstate: {exc}\n")
        return 2
    except (json.JSONDecodeError, OSError) as exc:
        sys.stderr.write(f"kvstate: {exc}\n")
        return 2
    except OperationNotFound as exc:
        sys.stderr.write(f"kvstate: {exc}\n")
        return 1
    except KvstateError as exc:
        sys.stderr.write(f"kvstate: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
