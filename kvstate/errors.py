"""Every exception kvstate raises, in one tree.

    KvstateError                      base of everything below
    ├── ConfigurationError            bad settings or environment
    ├── ServerVersionError            nats-server or nats-py too old
    ├── ClientClosedError             the client was used outside its context
    ├── BucketError                   the bucket is missing or misconfigured
    │   └── BucketNotFound            the bucket does not exist (yet)
    ├── ConnectionLostError           NATS could not be reached in time
    ├── PermissionDenied              NATS refused this user a subject (a permissions violation)
    │   └── AuthenticationFailed      NATS refused the connection's credentials or certificate
    ├── ValidationError               input rejected before anything was written
    │   ├── InvalidKey                an id or key that NATS cannot store
    │   ├── UnknownStage              a stage the pipeline does not define
    │   ├── UnknownPipeline           a pipeline that is not in the bucket
    │   ├── InvalidPipeline           a pipeline definition that is not a DAG
    │   ├── InvalidMetadata           metadata that is not a JSON object/value
    │   ├── ValueTooLarge             an encoded value over the bucket's limit
    │   └── InvalidJob                a bulk job refused: nothing matched, over the limit, bad fields
    ├── InvalidTransition             a state change the state machine forbids
    │   └── NotRetryable              a retry or re-drive of an unfinished operation, or with nothing to run
    ├── OperationNotFound             no operation under that id in the bucket
    ├── OperationExists               create() with an id that holds other data
    ├── ConflictError                 compare-and-set kept losing; retries exhausted
    ├── RevisionMismatch              a conditional update found another revision than expected
    ├── StaleUpdate                   raised by UpdateResult.raise_for_stale() on a stale event
    ├── CorruptValue                  a stored value that is not valid kvstate JSON
    ├── WaitTimeout                   wait() gave up before the operation finished
    └── JobError                      a bulk job cannot do what was asked
        ├── JobNotFound               no job under that id in the bucket
        ├── JobFinished               the job already ended: it cannot be cancelled or run again
        └── JobBusy                   another runner holds the job's lease

Only `kvstate._kv` catches `nats.js.errors.*`; it translates them into these, with the
original chained as `__cause__`.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "BucketError",
    "BucketNotFound",
    "ClientClosedError",
    "ConfigurationError",
    "ConflictError",
    "ConnectionLostError",
    "CorruptValue",
    "InvalidJob",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidPipeline",
    "InvalidTransition",
    "JobBusy",
    "JobError",
    "JobFinished",
    "JobNotFound",
    "KvstateError",
    "NotRetryable",
    "OperationExists",
    "OperationNotFound",
    "PermissionDenied",
    "RevisionMismatch",
    "ServerVersionError",
    "StaleUpdate",
    "UnknownPipeline",
    "UnknownStage",
    "ValidationError",
    "ValueTooLarge",
    "WaitTimeout",
]


class KvstateError(Exception):
    """Base class of every error kvstate raises."""


class ConfigurationError(KvstateError):
    """A setting or environment variable has a value kvstate cannot use."""


class ServerVersionError(KvstateError):
    """The connected nats-server, or the installed nats-py, is older than kvstate needs."""

    def __init__(self, component: str, found: str, required: str) -> None:
        self.component = component
        self.found = found
        self.required = required
        super().__init__(f"{component} {found} is too old: kvstate needs {component} >= {required}")


class ClientClosedError(KvstateError):
    """The client was used before it was opened or after it was closed."""


class BucketError(KvstateError):
    """The bucket does not exist, or exists with a configuration kvstate cannot use."""


class BucketNotFound(BucketError):
    """The bucket does not exist: ``kvstate bucket init`` (or ``create_bucket=True``) creates it."""


class ConnectionLostError(KvstateError):
    """NATS did not answer in time (no responders, timeout, connection closed)."""


class PermissionDenied(KvstateError):
    """NATS refused this connection's user a subject: the server's permissions forbid it (docs/security.md)."""

    def __init__(self, subject: str | None, action: str, detail: str = "") -> None:
        self.subject = subject
        """the subject the server named (lower-cased, as nats-py reports it), None when it named none"""
        self.action = action
        """what was refused: ``publish``, ``subscribe`` or ``connect``"""
        self.detail = detail
        """the server's words"""
        if subject is None:
            message = f"NATS refused to {action}: {detail}" if detail else f"NATS refused to {action}"
        else:
            message = f"NATS denies this user permission to {action} on {subject!r}"
            if detail:
                message += f" ({detail})"
        super().__init__(message)


class AuthenticationFailed(PermissionDenied):
    """NATS refused the connection: wrong or revoked credentials, or a client certificate it requires is missing."""

    def __init__(self, detail: str) -> None:
        super().__init__(None, "connect", detail)


class ValidationError(KvstateError):
    """Input was rejected before anything was written."""


class InvalidKey(ValidationError):
    """An operation id, pipeline name or key contains characters NATS keys cannot hold."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid key {key!r}: {reason}")


class UnknownStage(ValidationError):
    """The stage is not part of the operation's pipeline."""

    def __init__(self, stage: str, pipeline: str, known: tuple[str, ...] = ()) -> None:
        self.stage = stage
        self.pipeline = pipeline
        self.known = known
        hint = f" (stages: {', '.join(known)})" if known else ""
        super().__init__(f"pipeline {pipeline!r} has no stage {stage!r}{hint}")


class UnknownPipeline(ValidationError):
    """No pipeline definition under that name is stored in the bucket."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no pipeline named {name!r} in the bucket (store it with set_pipeline)")


class InvalidPipeline(ValidationError):
    """A pipeline definition has a cycle, a dangling dependency or a bad field."""


class InvalidMetadata(ValidationError):
    """Metadata that is not JSON-serialisable, or a patch that is not a JSON object."""


class ValueTooLarge(ValidationError):
    """The encoded operation is bigger than the bucket's max value size."""

    def __init__(self, key: str, size: int, limit: int, refused_by: str | None = None) -> None:
        self.key = key
        self.size = size
        """encoded size in bytes, -1 when only the server knew it"""
        self.limit = limit
        """the limit in bytes, -1 when only the server knew it"""
        if refused_by is not None:
            super().__init__(f"value for {key!r} is bigger than {refused_by} accepts")
        else:
            super().__init__(f"value for {key!r} is {size} bytes, over the bucket limit of {limit} bytes")


class InvalidJob(ValidationError):
    """A bulk job kvstate refuses to create: its filter matched nothing or more than the limit, or a field is wrong."""


class InvalidTransition(KvstateError):
    """The state machine forbids this change (for example starting a stage before its dependencies)."""

    def __init__(self, op_id: str, message: str, stage: str | None = None) -> None:
        self.op_id = op_id
        self.stage = stage
        where = f" stage {stage!r} of" if stage else ""
        super().__init__(f"illegal transition on{where} operation {op_id!r}: {message}")


class NotRetryable(InvalidTransition):
    """A retry or re-drive of an operation that has not finished, or of one with nothing to run again."""


class OperationNotFound(KvstateError):
    """No live operation under that id (it may never have existed, or was archived)."""

    def __init__(self, op_id: str, hint: str | None = None) -> None:
        self.op_id = op_id
        self.hint = hint
        super().__init__(f"operation {op_id!r} not found in the bucket" + (f"; {hint}" if hint else ""))


class OperationExists(KvstateError):
    """create() was called with an id that already holds a different operation."""

    def __init__(self, op_id: str, revision: int) -> None:
        self.op_id = op_id
        self.revision = revision
        super().__init__(f"operation {op_id!r} already exists (revision {revision})")


class ConflictError(KvstateError):
    """Compare-and-set lost to concurrent writers more times than allowed."""

    def __init__(self, key: str, expected_revision: int | None, attempts: int) -> None:
        self.key = key
        self.expected_revision = expected_revision
        self.attempts = attempts
        super().__init__(
            f"revision conflict on {key!r}: expected revision {expected_revision}, gave up after {attempts} attempts"
        )


class RevisionMismatch(KvstateError):
    """A conditional update (``expected_revision``, HTTP ``If-Match``) found the operation at another revision."""

    def __init__(self, op_id: str, expected: int, actual: int) -> None:
        self.op_id = op_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"operation {op_id!r} is at revision {actual}, not the expected {expected}")


class StaleUpdate(KvstateError):
    """An event that arrived too late to apply (raised on request: UpdateResult.raise_for_stale())."""

    def __init__(self, op_id: str, reason: str) -> None:
        self.op_id = op_id
        self.reason = reason
        super().__init__(f"stale update on operation {op_id!r}: {reason}")


class CorruptValue(KvstateError):
    """A value in the bucket is not valid JSON, or not kvstate's schema."""

    def __init__(self, key: str, revision: int, detail: str, raw: bytes = b"") -> None:
        self.key = key
        self.revision = revision
        self.detail = detail
        self.raw = raw
        super().__init__(f"corrupt value at {key!r} revision {revision}: {detail}")


class WaitTimeout(KvstateError):
    """wait() reached its timeout before the operation reached a terminal status."""

    def __init__(self, op_id: str, timeout: float, last_status: str | None) -> None:
        self.op_id = op_id
        self.timeout = timeout
        self.last_status = last_status
        super().__init__(f"operation {op_id!r} still {last_status or 'unknown'} after {timeout:g}s")


class JobError(KvstateError):
    """A bulk job (``kvstate.jobs``) cannot do what was asked."""


class JobNotFound(JobError):
    """No job under that id in the bucket."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found in the bucket")


class JobFinished(JobError):
    """The job already ended (done, failed or cancelled): it cannot be cancelled or run again."""

    def __init__(self, job_id: str, state: str) -> None:
        self.job_id = job_id
        self.state = state
        super().__init__(f"job {job_id!r} is already {state}")


class JobBusy(JobError):
    """Another runner holds the job's lease: two runners never run one job at once."""

    def __init__(self, job_id: str, owner: str, until: str) -> None:
        self.job_id = job_id
        self.owner = owner
        self.until = until
        super().__init__(f"job {job_id!r} is being run by {owner} (lease until {until})")
