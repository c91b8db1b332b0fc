"""The JSON API of bulk jobs and re-drives (``:retry`` of one operation is in dashboard.api).

    POST /api/jobs                               a bulk cancel or retry by the list's filter; ``dry_run``: how
                                                 many match, how many it would change, a sample (nothing created)
    GET  /api/jobs                               every job, newest first
    GET  /api/jobs/{id}                          one job: its state, counts and problems; ETag = revision
    POST /api/jobs/{id}:cancel                   cancel it: its runner stops before the next operation
    POST /api/jobs/{id}:resume                   run a paused job (or one whose runner died) in this dashboard
    POST /api/archive/operations/{id}:redrive    put an archived operation back into the bucket, run it again

Writes are protected as every write of the dashboard is: the write token when one is
configured (dashboard.security.check_write_access) and the CSRF token unless sent with
``Authorization: Bearer``. Bad input (a filter that matches nothing or more than
DASHBOARD_JOB_MAX_OPERATIONS, an unknown stage, a retry of a running operation) is a 4xx
through the one error table, with nothing created or changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import ResponseHeader
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, RequestBody, Schema
from litestar.openapi.spec import Operation as OpenAPIOperation
from litestar.params import FromPath, HeaderParameter, PathParameter

from dashboard.api import (
    _KEY_PATTERN,
    _WRITE_SECURITY,
    ID_PATTERN,
    OUTCOME_HEADER,
    _answer,
    _errors,
    _Found,
    _MethodOperation,
    _resource,
)
from dashboard.contexts import DashboardState
from dashboard.jobs import (
    JobList,
    JobPreview,
    JobRequest,
    JobResource,
    check_stages,
    decode_job_request,
    filter_of,
    job_resource,
    preview,
    select,
)
from dashboard.methods import cancel_reason, idempotency_key, retry_request
from dashboard.pages import Dashboard
from dashboard.resources import OperationResource
from dashboard.security import check_write_access
from kvstate import InvalidJob, Job, JobFinished, JobStore, new_job
from kvstate.jobs import JobAction
from kvstate.keys import validate_id

__all__ = ["ActionsApi", "create_job", "job_method"]

JOB_METHODS = {"cancel": "POST", "resume": "POST"}
"""The custom methods of a job (AIP-136)."""


def job_method(name: str, http_method: str) -> tuple[str, str]:
    """``(job id, method)`` of the path segment ``ID`` or ``ID:method`` (404 unknown method, 405 wrong verb)."""
    job_id, colon, method = name.removeprefix("jobs/").partition(":")
    if colon:
        if method not in JOB_METHODS:
            raise NotFoundException(f"a job has no method :{method[:32]} (it has POST :cancel, POST :resume)")
        if http_method != "POST":
            raise MethodNotAllowedException(f":{method} takes POST", headers={"Allow": "POST"})
    elif http_method != "GET":
        raise MethodNotAllowedException("POST to a job's method: ID:cancel or ID:resume", headers={"Allow": "GET"})
    return validate_id(job_id, "job id"), method


def _check_size(dashboard: DashboardState, body: bytes) -> None:
    if len(body) > dashboard.settings.max_body:
        raise HTTPException(status_code=413, detail="Request Entity Too Large")


async def create_job(dashboard: DashboardState, request: JobRequest) -> Job | JobPreview:
    """The job ``request`` asks for, stored and started here; with ``dry_run`` only its preview.

    The same checks either way, before anything is written: the filter (BadQuery), the
    action, the reason and the rate (InvalidJob), stages the matched operations' pipelines
    lack (UnknownStage), nothing matched or more than the limit (InvalidJob).
    """
    settings = dashboard.settings
    flt = filter_of(request.filter)
    rate = settings.job_rate if request.rate is None else request.rate
    if rate > settings.job_rate:
        raise InvalidJob(f"rate {rate:g} operations/s is above DASHBOARD_JOB_RATE, {settings.job_rate:g}")
    if request.action not in {a.value for a in JobAction}:
        raise InvalidJob(f"unknown action {request.action[:32]!r}: a job can {' or '.join(JobAction)}")
    limit = settings.job_max_operations
    selection = select(dashboard.index, flt, limit)
    if selection.more:
        raise InvalidJob(
            f"the filter matches more than the limit of {limit} operations per job "
            "(DASHBOARD_JOB_MAX_OPERATIONS): narrow it (by pipeline, status, created_before, ...) and run several jobs"
        )
    check_stages(dashboard.index, selection.matched, request.stages)
    job = new_job(
        None,
        request.action,
        [op.id for op in selection.matched],
        datetime.now(UTC),
        filter=request.filter.strip(),
        reason=request.reason,
        max_operations=limit,
        rate=rate,
        by=request.by or "api",
        stages=request.stages,
    )
    if request.dry_run:
        return preview(selection, job.filter, job.action.value, job.stages, limit)
    stored = await JobStore(dashboard.client).create(job)
    dashboard.supervisor.start(stored.id)
    return stored


def _job_answer(job: Job, status: int = 200) -> Response[JobResource]:
    headers = {"ETag": f'"{job.revision}"', "Cache-Control": "no-cache"}
    if status == 201:
        headers["Location"] = f"/api/jobs/{job.id}"
    return Response(job_resource(job), status_code=status, headers=headers)


_JOB_ERRORS = _errors(
    (400, "INVALID_ARGUMENT: a bad filter, action, reason, rate or stage; a filter matching nothing or too much"),
    (401, "UNAUTHENTICATED: the write token is configured and missing"),
    (403, "PERMISSION_DENIED: no CSRF token (send Authorization: Bearer, or X-CSRFToken)"),
    (404, "NOT_FOUND: no such job"),
    (409, "FAILED_PRECONDITION: the job already ended; ABORTED: another runner holds it"),
    (413, "the body is over the limit"),
)


_TEXT = Schema(type=OpenAPIType.STRING, max_length=4096)
_JOB_REQUEST = Schema(
    type=OpenAPIType.OBJECT,
    required=["filter", "action", "reason"],
    additional_properties=False,
    properties={
        "filter": _TEXT,
        "action": Schema(type=OpenAPIType.STRING, enum=[action.value for action in JobAction]),
        "reason": _TEXT,
        "stages": Schema(type=OpenAPIType.ARRAY, items=_TEXT),
        "by": Schema(one_of=[_TEXT, Schema(type=OpenAPIType.NULL)]),
        "rate": Schema(one_of=[Schema(type=OpenAPIType.NUMBER), Schema(type=OpenAPIType.NULL)]),
        "dry_run": Schema(type=OpenAPIType.BOOLEAN),
    },
)
"""The body of POST /api/jobs (dashboard.jobs.JobRequest), as the document states it."""


@dataclass
class _CreateJobOperation(OpenAPIOperation):
    """``POST /api/jobs`` with its body declared: the handler decodes it itself (clear 400s)."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"application/json": OpenAPIMediaType(schema=_JOB_REQUEST)}, required=True
        )


async def _job_method(request: Request[Any, Any, Any], dashboard: Dashboard, name: str) -> Response[JobResource]:
    """``POST /api/jobs/ID:cancel`` and ``ID:resume``."""
    job_id, method = job_method(name, "POST")
    check_write_access(request, dashboard.settings.auth_token)
    body = await request.body()
    _check_size(dashboard, body)
    jobs = JobStore(dashboard.client)
    if method == "cancel":
        reason = cancel_reason(body, request.headers.get("content-type", ""), "cancelled through the API")
        return _job_answer(await jobs.cancel(job_id, by="api", reason=reason))
    job = await jobs.get(job_id)
    if job.done:
        raise JobFinished(job.id, job.state.value)
    dashboard.supervisor.start(job.id)  # a lease another runner holds: the runner logs JobBusy and leaves it
    return _job_answer(job)


async def _redrive(request: Request[Any, Any, Any], dashboard: Dashboard, name: str) -> Response[OperationResource]:
    """``POST /api/archive/operations/ID:redrive``."""
    op_id, colon, method = name.partition(":")
    if not colon or method != "redrive":
        raise NotFoundException("an archived operation has one method: POST ID:redrive")
    validate_id(op_id)
    check_write_access(request, dashboard.settings.auth_token)
    body = await request.body()
    _check_size(dashboard, body)
    asked = retry_request(body)
    key = idempotency_key(request.headers)
    result = await dashboard.archive.redrive(
        dashboard.client, op_id, asked.stages or None, reason=asked.reason, by=asked.by or "api", event_id=key
    )
    found = _Found(_resource(dashboard, result.operation), result.revision, waitable=False)
    return _answer(found, {OUTCOME_HEADER: result.outcome.value})


class ActionsApi(Controller):
    """Bulk jobs and re-drives under /api."""

    path = "/api"
    tags = ["jobs"]

    @post(
        "/jobs",
        summary="Create a bulk cancel or retry over the operations a filter matches (or preview it)",
        description=(
            'Body: `{"filter": "status=failed AND pipeline=orders", "action": "cancel" | "retry", '
            '"reason": "...", "stages": [...], "by": "...", "rate": 10, "dry_run": false}`. The filter '
            "is the list's (`GET /api/operations?filter=`), evaluated now on the index; the job keeps the ids it "
            "matched, at most DASHBOARD_JOB_MAX_OPERATIONS, and this dashboard runs it at `rate` operations per "
            "second (at most DASHBOARD_JOB_RATE). `dry_run: true` answers 200 with the count, how many the action "
            "would change now and a sample, and creates nothing; otherwise 201 with the job. Each operation is "
            "changed under the event id `job:<job>:<operation>`, so a resumed job never changes one twice."
        ),
        status_code=201,
        operation_class=_CreateJobOperation,
        responses={200: ResponseSpec(JobPreview, description="the dry run"), **_JOB_ERRORS},
    )
    async def create(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> Response[Any]:
        check_write_access(request, dashboard.settings.auth_token)
        body = await request.body()
        _check_size(dashboard, body)
        result = await create_job(dashboard, decode_job_request(body))
        if isinstance(result, JobPreview):
            return Response(result, status_code=200)
        return _job_answer(result, 201)

    @get("/jobs", summary="Every bulk job in the bucket, newest first")
    async def list_jobs(self, dashboard: Dashboard) -> JobList:
        return JobList(jobs=[job_resource(job) for job in await JobStore(dashboard.client).list()])

    @get(
        "/jobs/{name:str}",
        summary="One bulk job: state, counts, what it skipped or failed and why (ETag = revision)",
        responses=_errors((400, "INVALID_ARGUMENT: not a job id"), (404, "NOT_FOUND: no such job")),
    )
    async def get_job(
        self,
        dashboard: Dashboard,
        name: Annotated[str, PathParameter(description="the job id", schema_extra={"pattern": ID_PATTERN})],
    ) -> Response[JobResource]:
        job_id, _ = job_method(name, "GET")
        return _job_answer(await JobStore(dashboard.client).get(job_id))

    @post("/jobs/{name:str}", status_code=200, include_in_schema=False)
    async def job_custom_method(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> Response[JobResource]:
        return await _job_method(request, dashboard, name)

    # The job methods at their real paths, for the OpenAPI document only (as in dashboard.api).

    @post(
        "/jobs/{name}:cancel",
        operation_class=_MethodOperation,
        operation_id="CancelJob",
        summary="Cancel a bulk job: its runner stops before the next operation",
        description=(
            'Body optional: `{"reason": "..."}`. The job ends as `cancelled`; what it changed so far stays '
            "changed. 409 once it ended."
        ),
        status_code=200,
        responses=_JOB_ERRORS,
        security=_WRITE_SECURITY,
    )
    async def cancel_job_documented(
        self, request: Request[Any, Any, Any], dashboard: Dashboard
    ) -> Response[JobResource]:
        return await _job_method(request, dashboard, "{name}:cancel")  # only the literal path: 400

    @post(
        "/jobs/{name}:resume",
        operation_class=_MethodOperation,
        operation_id="ResumeJob",
        summary="Run a paused job, or one whose runner died (its lease expired), in this dashboard",
        description="Answers the job; 409 once it ended, or while another runner's lease holds.",
        status_code=200,
        responses=_JOB_ERRORS,
        security=_WRITE_SECURITY,
    )
    async def resume_job_documented(
        self, request: Request[Any, Any, Any], dashboard: Dashboard
    ) -> Response[JobResource]:
        return await _job_method(request, dashboard, "{name}:resume")  # only the literal path: 400

    @post("/archive/operations/{name:str}", status_code=200, include_in_schema=False)
    async def redrive(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, name: FromPath[str]
    ) -> Response[OperationResource]:
        return await _redrive(request, dashboard, name)

    @post(
        "/archive/operations/{name}:redrive",
        operation_class=_MethodOperation,
        operation_id="RedriveArchivedOperation",
        tags=["archive"],
        summary="ID:redrive: put an archived operation back into the bucket and run it again from a stage",
        description=(
            'Body: `{"reason": "why", "stages": ["geo"], "by": "who"}` (stages optional: the failed stage; a '
            "cancelled operation resumes where it stopped). The newest archived snapshot goes back under its id, "
            "linked to it (an action of kind `redrive` with the archived revision); it is archived as a row of its "
            "own when it finishes again. 409 while the bucket still holds the id (retry it there: `:retry`) or "
            "with nothing to run again, 400 for an unknown stage, 404 when the archive does not hold it, 503 "
            "without an archive. `Idempotency-Key` makes a repeated re-drive a `duplicate`."
        ),
        status_code=200,
        response_headers=[
            ResponseHeader(name=OUTCOME_HEADER, description="applied or duplicate", documentation_only=True)
        ],
        security=_WRITE_SECURITY,
        responses=_errors(
            (400, "INVALID_ARGUMENT: no reason, an unknown stage, a bad Idempotency-Key"),
            (401, "UNAUTHENTICATED: the token is configured and missing or wrong"),
            (403, "PERMISSION_DENIED: no CSRF token (send Authorization: Bearer, or X-CSRFToken), or cross-site"),
            (404, "NOT_FOUND: not in the archive"),
            (413, "the body is over the limit"),
            (409, "ALREADY_EXISTS: still in the bucket; FAILED_PRECONDITION: nothing to run again"),
            (503, "UNAVAILABLE: no archive configured, or PostgreSQL unreachable"),
        ),
    )
    async def redrive_documented(
        self,
        request: Request[Any, Any, Any],
        dashboard: Dashboard,
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(name="Idempotency-Key", description="the event id", schema_extra={"pattern": _KEY_PATTERN}),
        ] = None,
    ) -> Response[OperationResource]:
        return await _redrive(request, dashboard, "{name}:redrive")  # only the literal path: 400
