"""The public API is what kvstate/__init__.py exports: pinned here, like httpx does."""

from __future__ import annotations

from pathlib import Path

import pytest

import kvstate
from kvstate import errors

EXPECTED = {
    "Action",
    "ActionKind",
    "Attempt",
    "AuthenticationFailed",
    "BucketConfig",
    "BucketError",
    "BucketInfo",
    "BucketNotFound",
    "Cancel",
    "CancelInfo",
    "Change",
    "ChangeFeed",
    "Client",
    "ClientClosedError",
    "ConfigurationError",
    "ConflictError",
    "ConnectionLostError",
    "CorruptValue",
    "Decision",
    "Event",
    "FailStage",
    "FeedMessage",
    "FeedState",
    "Heartbeat",
    "InvalidJob",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidPipeline",
    "InvalidTransition",
    "Job",
    "JobAction",
    "JobBusy",
    "JobError",
    "JobFinished",
    "JobNotFound",
    "JobRunner",
    "JobState",
    "JobStore",
    "KvstateError",
    "MergeMetadata",
    "NotRetryable",
    "OpStatus",
    "Operation",
    "OperationExists",
    "OperationNotFound",
    "Outcome",
    "PermissionDenied",
    "Pipeline",
    "Reopen",
    "Revision",
    "RevisionMismatch",
    "ServerVersionError",
    "Settings",
    "SkipStage",
    "StageError",
    "StageSpec",
    "StageState",
    "StageStatus",
    "StaleUpdate",
    "StartStage",
    "StuckCheck",
    "StuckKind",
    "StuckStage",
    "SucceedStage",
    "SyncClient",
    "TERMINAL_STATUSES",
    "Transition",
    "UnknownPipeline",
    "UnknownStage",
    "UpdateResult",
    "ValidationError",
    "ValueTooLarge",
    "WaitTimeout",
    "Watcher",
    "apply_event",
    "attempts",
    "connect",
    "derive_status",
    "failed_stage",
    "failure_message",
    "merge_patch",
    "new_job",
    "new_operation",
    "queued_stages",
    "ready_since",
    "ready_stages",
    "retry_stages",
    "sla_breached",
    "sla_due",
    "stuck_checks",
    "stuck_reason",
    "stuck_stages",
    "__version__",
}


def test_exported_members_are_pinned() -> None:
    assert set(kvstate.__all__) == EXPECTED
    for name in kvstate.__all__:
        assert hasattr(kvstate, name), name


def test_every_error_derives_from_kvstate_error_and_is_documented() -> None:
    docs = Path("docs/errors.md").read_text()
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.KvstateError)
        assert cls.__doc__, name
        assert name in (errors.__doc__ or ""), f"{name} missing from the tree in the errors module docstring"
        assert f"`{name}`" in docs, f"{name} missing from docs/errors.md"


def test_conflict_codes_from_both_server_paths_become_conflict_error() -> None:
    import nats.js.errors

    from kvstate._kv import nats_errors

    for code in (10071, 10164):
        with pytest.raises(errors.ConflictError) as info, nats_errors("op.x", 7):
            raise nats.js.errors.APIError(code=400, err_code=code, description="wrong last sequence")
        assert info.value.key == "op.x"
        assert info.value.expected_revision == 7
        assert isinstance(info.value.__cause__, nats.js.errors.APIError)


def test_the_version_has_one_source() -> None:
    """pyproject.toml reads the version from kvstate.__version__; the installed metadata agrees."""
    import tomllib
    from importlib.metadata import version

    project = tomllib.loads(Path("pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["hatch"]["version"]["path"] == "kvstate/__init__.py"
    assert version("kvstate") == kvstate.__version__
