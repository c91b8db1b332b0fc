"""``kvstate retry`` and ``kvstate jobs``: what operators do to operations, beyond watching them.

    kvstate retry ID [--stage S]... --reason TEXT        run a finished operation again
    kvstate jobs list | show ID | cancel ID | run ID     bulk jobs in the bucket
    kvstate jobs create --filter EXPR --action cancel|retry --reason TEXT [--dry-run]

``retry``, ``list``, ``show``, ``cancel`` and ``run`` talk to the bucket. ``create`` asks the
dashboard (``POST /api/jobs``): a job's filter is the dashboard list's filter, evaluated on the
dashboard's index, which also runs the job it creates (``run`` resumes one from here).

Exit codes as everywhere in ``kvstate``: 0 done, 1 the command ran and failed (not found, a
job that ended failed or cancelled, another runner holds the job), 2 a request that cannot
be done as asked, nothing changed: an unknown stage, a retry of an operation still running,
a filter that matches nothing or more than the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import http.cookiejar
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec

from kvstate.cli import _age, _common, _print_json, _table, _with_client
from kvstate.client import Client
from kvstate.errors import InvalidTransition, JobBusy, JobFinished, JobNotFound, ValidationError
from kvstate.job_runner import JobRunner, JobStore, runner_name
from kvstate.jobs import Job, JobAction, JobState

__all__ = ["register"]

DEFAULT_DASHBOARD = "http://127.0.0.1:8000"
_REFUSED = (ValidationError, InvalidTransition)
"""refusals of a request as asked (nothing written): exit code 2"""


def _refusing(handler: Callable[[argparse.Namespace, Mapping[str, str]], int]) -> Any:
    """``handler`` with the refusals of an operator action as exit code 2 (the CLI's bad-usage code)."""

    def wrapped(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
        try:
            return handler(args, environ)
        except _REFUSED as exc:
            sys.stderr.write(f"kvstate: {exc}\n")
            return 2
        except (JobNotFound, JobFinished, JobBusy) as exc:
            sys.stderr.write(f"kvstate: {exc}\n")
            return 1

    return wrapped


# ---------------------------------------------------------------- kvstate retry


def _cmd_retry(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    async def body(client: Client) -> int:
        result = await client.retry(
            args.id,
            args.stage or None,
            reason=args.reason,
            by=args.by,
            event_id=args.event_id,
            expected_revision=args.revision,
        )
        if args.json:
            _print_json({"outcome": result.outcome.value, "operation": result.operation}, sys.stdout)
            return 0
        op = result.operation
        action = next((a for a in reversed(op.actions) if a.kind == "reopen"), None)
        stages = ", ".join(action.stages) if action is not None else "-"
        sys.stdout.write(
            f"{result.outcome.value}: {op.id} is {op.status.value} at revision {result.revision}, "
            f"running again from {stages}\n"
        )
        return 0

    return asyncio.run(_with_client(environ, args, body))


# ---------------------------------------------------------------- kvstate jobs


def _progress(job: Job) -> str:
    c = job.counts
    return f"{job.cursor}/{len(job.targets)} (applied {c.applied}, skipped {c.skipped}, failed {c.failed})"


def _job_dict(job: Job) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.to_builtins(job)
    data["revision"] = job.revision
    return data


def _job_text(job: Job, now: datetime) -> None:
    out = sys.stdout
    out.write(f"id:        {job.id}\n")
    out.write(f"action:    {job.action.value}" + (f" from {', '.join(job.stages)}" if job.stages else "") + "\n")
    out.write(f"state:     {job.state.value}\n")
    out.write(f"filter:    {job.filter}\n")
    out.write(f"reason:    {job.reason}\n")
    out.write(f"by:        {job.by or '-'}\n")
    out.write(f"progress:  {_progress(job)} at most {job.rate:g}/s\n")
    out.write(f"created:   {job.created_at.isoformat()} ({_age(job.created_at, now)} ago)\n")
    if job.finished_at is not None:
        out.write(f"finished:  {job.finished_at.isoformat()}\n")
    if job.lease is not None and not job.done:
        expired = " (expired: resume it with kvstate jobs run)" if job.lease.until <= now else ""
        out.write(f"runner:    {job.lease.owner} until {job.lease.until.isoformat()}{expired}\n")
    if job.cancel is not None:
        out.write(f"cancelled: {job.cancel.reason or '-'} (by {job.cancel.by or '-'})\n")
    if job.problems:
        out.write("\n")
        _table([[p.op_id, p.result, p.message] for p in job.problems], ["operation", "result", "why"], out)


def _cmd_jobs(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if args.action == "create":
        return _create(args, environ)

    async def body(client: Client) -> int:
        jobs = JobStore(client)
        now = datetime.now(UTC)
        if args.action == "list":
            found = await jobs.list()
            if args.json:
                _print_json([_job_dict(j) for j in found], sys.stdout)
                return 0
            rows = [
                [j.id, j.action.value, j.state.value, _progress(j), _age(j.created_at, now), j.by or "-", j.filter[:60]]
                for j in found
            ]
            _table(rows, ["id", "action", "state", "progress", "age", "by", "filter"], sys.stdout)
            return 0
        if args.action == "show":
            job = await jobs.get(args.id)
            _print_json(_job_dict(job), sys.stdout) if args.json else _job_text(job, now)
            return 0
        if args.action == "cancel":
            job = await jobs.cancel(args.id, by=args.by, reason=args.reason)
            sys.stdout.write(f"job {job.id} cancelled at {_progress(job)}\n")
            return 0
        return await _run(client, args.id, args.json)

    return asyncio.run(_with_client(environ, args, body))


async def _run(client: Client, job_id: str, as_json: bool) -> int:
    """``kvstate jobs run``: resume the job here until it ends; SIGINT/SIGTERM pause it (resumable)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = [0.0]

    def on_step(job: Job) -> None:
        if time.monotonic() - shown[0] >= 1.0 or job.cursor == len(job.targets):
            shown[0] = time.monotonic()
            sys.stderr.write(f"job {job.id}: {_progress(job)}\n")

    try:
        job = await JobRunner(client, owner=runner_name("kvstate-cli"), on_step=on_step).run(job_id, stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if as_json:
        _print_json(_job_dict(job), sys.stdout)
    else:
        hint = f"; resume it with kvstate jobs run {job.id}" if job.state is JobState.PAUSED else ""
        sys.stdout.write(f"job {job.id} {job.state.value}: {_progress(job)}{hint}\n")
    return 0 if job.state is JobState.DONE else 1


# ---------------------------------------------------------------- kvstate jobs create (through the dashboard)


class _Dashboard:
    """The dashboard's JSON API with the write token as a bearer token, or else the CSRF token and cookie."""

    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self._opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def _send(self, method: str, path: str, body: object | None, headers: dict[str, str]) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                detail = json.loads(exc.read() or b"null")
            except ValueError:
                detail = None
            return exc.code, detail

    def post(self, path: str, body: object) -> tuple[int, Any]:
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        else:
            status, answer = self._send("GET", "/api/csrf", None, {})
            if status != 200 or not isinstance(answer, dict):
                return status, answer
            headers["X-CSRFToken"] = str(answer.get("csrf_token", ""))
        return self._send("POST", path, body, headers)


def _create(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    dashboard = _Dashboard(args.dashboard, args.token or environ.get("DASHBOARD_AUTH_TOKEN"))
    request: dict[str, Any] = {
        "filter": args.filter,
        "action": args.job_action,
        "reason": args.reason,
        "dry_run": args.dry_run,
    }
    if args.stage:
        request["stages"] = args.stage
    if args.rate is not None:
        request["rate"] = args.rate
    request["by"] = args.by
    try:
        status, answer = dashboard.post("/api/jobs", request)
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"kvstate: cannot reach the dashboard at {args.dashboard} ({exc}): jobs are created there\n")
        return 1
    if status >= 400:
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) else None
        sys.stderr.write(f"kvstate: the dashboard answered {status}: {message or answer}\n")
        return 2 if 400 <= status < 500 and status not in (404, 409) else 1
    if args.json:
        _print_json(answer, sys.stdout)
    elif args.dry_run:
        sys.stdout.write(
            f"{answer['matched']} operations match {args.filter!r}; {answer['eligible']} can be "
            f"{'cancelled' if args.job_action == JobAction.CANCEL.value else 'retried'} now "
            f"(the others will be skipped); limit {answer['limit']} per job\n"
        )
        rows = [[op["id"], op["pipeline"], op["status"]] for op in answer.get("sample", [])]
        if rows:
            _table(rows, ["id", "pipeline", "status"], sys.stdout)
    else:
        sys.stdout.write(f"{answer['id']}\n")
        sys.stderr.write(
            f"job {answer['id']} created for {answer['counts']['matched']} operations; the dashboard runs it "
            f"(kvstate jobs show {answer['id']})\n"
        )
    return 0


# ---------------------------------------------------------------- parsers


def register(sub: Any) -> None:
    """Add ``kvstate retry`` and ``kvstate jobs`` to the ``kvstate`` command's subparsers."""
    p = sub.add_parser("retry", help="run a finished operation again from a stage (default: its failed stage)")
    p.add_argument("id")
    p.add_argument("--stage", action="append", help="a stage to run again, with every stage after it (repeatable)")
    p.add_argument("--reason", required=True, help="why (recorded in the operation's actions)")
    p.add_argument("--by", default="kvstate-cli", help="who (recorded with the reason; default kvstate-cli)")
    p.add_argument("--revision", type=int, help="only if the operation is still at this revision")
    p.add_argument("--event-id", help="the event id (repeat a retry with it to make it a duplicate, not a second)")
    _common(p)
    p.set_defaults(handler=_refusing(_cmd_retry))

    jobs = sub.add_parser("jobs", help="bulk cancel or retry by filter, as recorded, resumable jobs")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every job in the bucket, newest first")
    show = actions.add_parser("show", help="one job: its state, progress, and what it skipped or failed")
    show.add_argument("id")
    cancel = actions.add_parser("cancel", help="cancel a job: its runner stops before the next operation")
    cancel.add_argument("id")
    cancel.add_argument("--reason")
    cancel.add_argument("--by", default="kvstate-cli")
    run = actions.add_parser("run", help="resume a job here (paused, or its runner died) until it ends")
    run.add_argument("id")
    create = actions.add_parser("create", help="create a job on the dashboard, which runs it (see --dry-run)")
    create.add_argument("--filter", required=True, help="the list's filter: 'status=failed AND pipeline=orders'")
    create.add_argument("--action", dest="job_action", required=True, choices=[a.value for a in JobAction])
    create.add_argument("--stage", action="append", help="retry: a stage to run again (default: the failed stage)")
    create.add_argument("--reason", required=True)
    create.add_argument("--by", default="kvstate-cli", help="who (recorded in the job; default kvstate-cli)")
    create.add_argument("--rate", type=float, help="operations per second (default: the dashboard's setting)")
    create.add_argument("--dry-run", action="store_true", help="only show how many match, and a sample")
    create.add_argument("--dashboard", default=DEFAULT_DASHBOARD, help=f"dashboard URL (default {DEFAULT_DASHBOARD})")
    create.add_argument("--token", help="the dashboard's write token (default: $DASHBOARD_AUTH_TOKEN)")
    for parser in (listing, show, cancel, run, create):
        _common(parser)
        parser.set_defaults(handler=_refusing(_cmd_jobs))
