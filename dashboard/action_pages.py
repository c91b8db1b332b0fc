"""The pages of operator actions: retry and re-drive forms on the detail page, bulk jobs and their pages.

    POST /operations/{id}/retry      the detail page's retry form (a finished live operation)
    POST /operations/{id}/redrive    the detail page's re-drive form (an archived operation)
    POST /jobs/preview               the list page's bulk form: the confirmation (count, sample), nothing created
    POST /jobs                       the confirmation's button: the job created and started here
    GET  /jobs, /partials/jobs       every job, with its progress
    GET  /jobs/{id}, /partials/jobs/{id}
    POST /jobs/{id}/cancel, /jobs/{id}/resume

Every form carries the CSRF token and, when one is configured, the write token
(``check_write_access``), exactly as the cancel form does. Errors are not caught here:
dashboard.errors answers them (an htmx request gets the error fragment in place).
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Request, Response, get, post
from litestar.datastructures import FormMultiDict
from litestar.params import FromPath
from litestar.response import Redirect

from dashboard.actions_api import create_job
from dashboard.contexts import banner_context, job_context, jobs_context
from dashboard.errors import BadQuery, is_htmx
from dashboard.jobs import JobPreview, JobRequest
from dashboard.pages import MAX_REASON, Dashboard, HtmlResponse, Templates
from dashboard.security import check_write_access
from kvstate import Job, JobFinished, JobStore
from kvstate.keys import validate_id

__all__ = ["ActionPages"]

_MAX_STAGES = 64


def _reason(form: FormMultiDict, *, required: bool = True) -> str:
    reason = str(form.get("reason") or "").strip()
    if required and not reason:
        raise BadQuery("reason", "say why")
    if len(reason) > MAX_REASON:
        raise BadQuery("reason", f"at most {MAX_REASON} characters")
    return reason


def _stages(form: FormMultiDict) -> list[str]:
    stages = [str(s).strip() for s in form.getall("stage", []) if str(s).strip()]
    if len(stages) > _MAX_STAGES:
        raise BadQuery("stage", f"at most {_MAX_STAGES} stages")
    return stages


def _revision(form: FormMultiDict) -> int | None:
    raw = str(form.get("revision") or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 19:
        raise BadQuery("revision", "the revision the page showed, a number")
    return int(raw)


def _write_access(request: Request[Any, Any, Any], dashboard: Dashboard, form: FormMultiDict) -> None:
    token = form.get("token")
    check_write_access(request, dashboard.settings.auth_token, token if isinstance(token, str) else None)


def _job_request(form: FormMultiDict, *, dry_run: bool) -> JobRequest:
    action = str(form.get("action") or "")
    stages = _stages(form) if action == "retry" else []
    return JobRequest(
        filter=str(form.get("filter") or ""),
        action=action,
        reason=_reason(form),
        stages=stages,
        by="dashboard",
        dry_run=dry_run,
    )


class ActionPages(Controller):
    """Forms and pages of retries, re-drives and bulk jobs."""

    include_in_schema = False

    @post("/operations/{op_id:str}/retry", status_code=200)
    async def retry(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, op_id: FromPath[str]
    ) -> Response[Any]:
        validate_id(op_id)
        form = await request.form()
        reason, stages, revision = _reason(form), _stages(form), _revision(form)
        _write_access(request, dashboard, form)
        result = await dashboard.client.retry(
            op_id, stages or None, reason=reason, by="dashboard", expected_revision=revision
        )
        if not is_htmx(request):  # a plain form post (no JavaScript): back to the page
            return Redirect(f"/operations/{op_id}", status_code=303)
        context = {"result": result, "op_id": op_id, "done": "runs again", "action": result.operation.actions[-1]}
        return renderer.response(request, "partials/action_result.html", context)

    @post("/operations/{op_id:str}/redrive", status_code=200)
    async def redrive(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, op_id: FromPath[str]
    ) -> Response[Any]:
        validate_id(op_id)
        form = await request.form()
        reason, stages = _reason(form), _stages(form)
        _write_access(request, dashboard, form)
        result = await dashboard.archive.redrive(dashboard.client, op_id, stages or None, reason=reason, by="dashboard")
        if not is_htmx(request):
            return Redirect(f"/operations/{op_id}", status_code=303)
        context = {
            "result": result,
            "op_id": op_id,
            "done": "is back in the bucket and runs again",
            "action": result.operation.actions[-1],
        }
        return renderer.response(request, "partials/action_result.html", context)

    @post("/jobs/preview", status_code=200)
    async def preview(self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates) -> HtmlResponse:
        """The bulk form's confirmation: how many the filter matches, how many it would change, a sample."""
        form = await request.form()
        asked = _job_request(form, dry_run=True)
        found = await create_job(dashboard, asked)
        assert isinstance(found, JobPreview)  # a dry run creates nothing
        context = {"preview": found, "reason": asked.reason, "stages": asked.stages}
        template = "partials/bulk_preview.html" if is_htmx(request) else "bulk_preview.html"
        return renderer.response(request, template, context)

    @post("/jobs", status_code=303)
    async def create(self, request: Request[Any, Any, Any], dashboard: Dashboard) -> Response[Any]:
        form = await request.form()
        asked = _job_request(form, dry_run=False)
        _write_access(request, dashboard, form)
        job = await create_job(dashboard, asked)
        assert isinstance(job, Job)
        if is_htmx(request):  # htmx follows a redirect in place; the job's own page is where to go
            return Response("", status_code=200, headers={"HX-Redirect": f"/jobs/{job.id}"})
        return Redirect(f"/jobs/{job.id}", status_code=303)

    @get("/jobs", name="jobs")
    async def jobs(self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await jobs_context(dashboard, now) | banner_context(dashboard, now)
        return renderer.response(request, "jobs.html", context, started=started)

    @get("/partials/jobs")
    async def jobs_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        return renderer.response(request, "partials/jobs.html", await jobs_context(dashboard, now), started=started)

    @get("/jobs/{job_id:str}", name="job")
    async def job(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, job_id: FromPath[str]
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await job_context(dashboard, job_id, now) | banner_context(dashboard, now)
        return renderer.response(request, "job.html", context, started=started)

    @get("/partials/jobs/{job_id:str}")
    async def job_fragment(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, job_id: FromPath[str]
    ) -> HtmlResponse:
        started, now = time.perf_counter(), time.time()
        context = await job_context(dashboard, job_id, now)
        return renderer.response(request, "partials/job.html", context, started=started)

    @post("/jobs/{job_id:str}/cancel", status_code=200)
    async def cancel(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, job_id: FromPath[str]
    ) -> Response[Any]:
        validate_id(job_id, "job id")
        form = await request.form()
        reason = _reason(form, required=False) or "cancelled in the dashboard"
        _write_access(request, dashboard, form)
        await JobStore(dashboard.client).cancel(job_id, by="dashboard", reason=reason)
        return await self._job_answer(request, dashboard, renderer, job_id)

    @post("/jobs/{job_id:str}/resume", status_code=200)
    async def resume(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, job_id: FromPath[str]
    ) -> Response[Any]:
        validate_id(job_id, "job id")
        form = await request.form()
        _write_access(request, dashboard, form)
        job = await JobStore(dashboard.client).get(job_id)
        if job.done:
            raise JobFinished(job.id, job.state.value)
        dashboard.supervisor.start(job.id)
        return await self._job_answer(request, dashboard, renderer, job_id)

    async def _job_answer(
        self, request: Request[Any, Any, Any], dashboard: Dashboard, renderer: Templates, job_id: str
    ) -> Response[Any]:
        if not is_htmx(request):
            return Redirect(f"/jobs/{job_id}", status_code=303)
        return renderer.response(request, "partials/job.html", await job_context(dashboard, job_id, time.time()))
