"""Every error class kvstate, the archive reader and the dashboard raise has its documented HTTP answer.

The classes are walked from the modules' ``__all__``, so a new error class fails here until
it has a row in ``dashboard.errors.ERROR_STATUS``, in ``EXPECTED`` and in the table of
docs/dashboard.md#errors. Each is raised by a route registered on the real app (real NATS
behind it) and answered by the app's one exception handler, as JSON and as a page.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import AsyncTestClient

import dashboard.errors as dashboard_errors
from archiver import errors as archiver_errors
from dashboard.errors import ERROR_STATUS
from kvstate import errors as kvstate_errors

Http = AsyncTestClient[Litestar]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "dashboard.md"

# class name -> (HTTP status, google.rpc.Code name in the JSON body)
EXPECTED: dict[str, tuple[int, str]] = {
    "KvstateError": (500, "INTERNAL"),
    "ConfigurationError": (500, "INTERNAL"),
    "ServerVersionError": (500, "INTERNAL"),
    "ClientClosedError": (503, "UNAVAILABLE"),
    "BucketError": (503, "UNAVAILABLE"),
    "BucketNotFound": (503, "UNAVAILABLE"),
    "ConnectionLostError": (503, "UNAVAILABLE"),
    "PermissionDenied": (403, "PERMISSION_DENIED"),
    "AuthenticationFailed": (503, "UNAVAILABLE"),
    "ValidationError": (400, "INVALID_ARGUMENT"),
    "InvalidKey": (400, "INVALID_ARGUMENT"),
    "UnknownStage": (400, "INVALID_ARGUMENT"),
    "UnknownPipeline": (400, "INVALID_ARGUMENT"),
    "InvalidPipeline": (400, "INVALID_ARGUMENT"),
    "InvalidMetadata": (400, "INVALID_ARGUMENT"),
    "ValueTooLarge": (413, "INVALID_ARGUMENT"),
    "InvalidJob": (400, "INVALID_ARGUMENT"),
    "InvalidTransition": (409, "FAILED_PRECONDITION"),
    "NotRetryable": (409, "FAILED_PRECONDITION"),
    "OperationNotFound": (404, "NOT_FOUND"),
    "OperationExists": (409, "ALREADY_EXISTS"),
    "ConflictError": (409, "ABORTED"),
    "RevisionMismatch": (412, "FAILED_PRECONDITION"),
    "StaleUpdate": (409, "ABORTED"),
    "CorruptValue": (409, "DATA_LOSS"),
    "WaitTimeout": (504, "DEADLINE_EXCEEDED"),
    "JobError": (500, "INTERNAL"),
    "JobNotFound": (404, "NOT_FOUND"),
    "JobFinished": (409, "FAILED_PRECONDITION"),
    "JobBusy": (409, "ABORTED"),
    "ArchiverError": (500, "INTERNAL"),
    "ArchiveUnavailable": (503, "UNAVAILABLE"),
    "ArchiveAccessDenied": (503, "UNAVAILABLE"),
    "MigrationError": (503, "UNAVAILABLE"),
    "InvalidPageToken": (400, "INVALID_ARGUMENT"),
    "InvalidQuery": (400, "INVALID_ARGUMENT"),
    "DashboardError": (500, "INTERNAL"),
    "BadQuery": (400, "INVALID_ARGUMENT"),
}

SAMPLES: dict[str, Callable[[], Exception]] = {
    "ServerVersionError": lambda: kvstate_errors.ServerVersionError("nats-server", "2.9.0", "2.11.0"),
    "InvalidKey": lambda: kvstate_errors.InvalidKey("bad id", "spaces are not allowed"),
    "UnknownStage": lambda: kvstate_errors.UnknownStage("paint", "orders", ("ingest",)),
    "UnknownPipeline": lambda: kvstate_errors.UnknownPipeline("nope"),
    "ValueTooLarge": lambda: kvstate_errors.ValueTooLarge("op.a", 2048, 1024),
    "InvalidTransition": lambda: kvstate_errors.InvalidTransition("a", "dependencies not finished", "geo"),
    "OperationNotFound": lambda: kvstate_errors.OperationNotFound("a"),
    "OperationExists": lambda: kvstate_errors.OperationExists("a", 3),
    "ConflictError": lambda: kvstate_errors.ConflictError("op.a", 3, 5),
    "RevisionMismatch": lambda: kvstate_errors.RevisionMismatch("a", 3, 4),
    "StaleUpdate": lambda: kvstate_errors.StaleUpdate("a", "already cancelled"),
    "CorruptValue": lambda: kvstate_errors.CorruptValue("op.a", 7, "not json", b"{oops"),
    "WaitTimeout": lambda: kvstate_errors.WaitTimeout("a", 1.5, "running"),
    "NotRetryable": lambda: kvstate_errors.NotRetryable("a", "it is running: only a finished operation can be retried"),
    "JobNotFound": lambda: kvstate_errors.JobNotFound("j1"),
    "JobFinished": lambda: kvstate_errors.JobFinished("j1", "done"),
    "JobBusy": lambda: kvstate_errors.JobBusy("j1", "dashboard@host:1", "2026-01-01T00:00:00+00:00"),
    "PermissionDenied": lambda: kvstate_errors.PermissionDenied("$kv.operations.pipeline.x", "publish"),
    "AuthenticationFailed": lambda: kvstate_errors.AuthenticationFailed("authorization violation"),
    "InvalidPageToken": lambda: archiver_errors.InvalidPageToken("garbage", "not a token from this archive"),
    "BadQuery": lambda: dashboard_errors.BadQuery("status", "unknown status"),
}


def error_classes() -> list[type[Exception]]:
    """Every exception class kvstate.errors, archiver.errors and dashboard.errors export."""
    classes: list[type[Exception]] = []
    for module in (kvstate_errors, archiver_errors, dashboard_errors):
        for name in module.__all__:
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Exception):
                classes.append(value)
    return classes


def sample(cls: type[Exception]) -> Exception:
    factory = SAMPLES.get(cls.__name__)
    return factory() if factory is not None else cls(f"a {cls.__name__} for the test")


def documented() -> dict[str, int]:
    """``error class -> status`` from the table under "## Errors" in docs/dashboard.md."""
    text = DOCS.read_text()
    section = text[text.index("\n## Errors") :]
    section = section[: section.find("\n## ", 1)]
    table: dict[str, int] = {}
    for row in re.findall(r"^\|(.+)\|\s*$", section, flags=re.MULTILINE):
        cells = [cell.strip() for cell in row.split("|")]
        if len(cells) >= 2 and cells[1].isdigit():
            for name in re.findall(r"`(\w+)`", cells[0]):
                table[name] = int(cells[1])
    return table


CLASSES = error_classes()


def test_every_error_class_has_an_explicit_status_and_a_documented_one() -> None:
    names = [cls.__name__ for cls in CLASSES]
    missing = [cls.__name__ for cls in CLASSES if cls not in ERROR_STATUS]
    assert not missing, f"add {missing} to dashboard.errors.ERROR_STATUS, EXPECTED here and docs/dashboard.md#errors"
    assert sorted(EXPECTED) == sorted(set(names))  # one expectation per class, none left over
    docs = documented()
    assert {name: docs.get(name) for name in names} == {name: EXPECTED[name][0] for name in names}


@pytest.fixture
def raising(app: Litestar) -> dict[str, type[Exception]]:
    """Routes on the real app that raise the error class they name: ``/api/raise/X`` (JSON) and ``/raise/X``."""
    by_name = {f"{cls.__module__}.{cls.__name__}": cls for cls in CLASSES}

    @get(["/api/raise/{name:str}", "/raise/{name:str}"], include_in_schema=False, sync_to_thread=False)
    def raise_error(name: FromPath[str]) -> None:
        raise sample(by_name[name])

    app.register(raise_error)
    return by_name


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: f"{cls.__module__}.{cls.__name__}")
async def test_each_error_answers_its_documented_status_as_json_page_and_fragment(
    http: Http, raising: dict[str, type[Exception]], cls: type[Exception]
) -> None:
    status, rpc = EXPECTED[cls.__name__]
    name = f"{cls.__module__}.{cls.__name__}"
    api = await http.get(f"/api/raise/{name}")
    assert api.status_code == status, api.text
    error = api.json()["error"]
    assert error == {"code": status, "status": rpc, "message": error["message"]}
    assert ("retry-after" in api.headers) is (status == 503)
    assert "Traceback" not in api.text
    if status == 500:  # nothing internal: the exception's text is not shown
        assert "for the test" not in error["message"] and "logged" in error["message"]
    else:
        assert str(sample(cls)) in error["message"]
    page = await http.get(f"/raise/{name}")
    assert page.status_code == status and page.headers["content-type"].startswith("text/html")
    assert f"<h1>{status} · " in page.text and "<html" in page.text
    fragment = await http.get(f"/raise/{name}", headers={"HX-Request": "true"})
    assert fragment.status_code == status and "<html" not in fragment.text and f"<h1>{status} · " in fragment.text
    assert ("retry-after" in page.headers) is ("retry-after" in fragment.headers) is (status == 503)
