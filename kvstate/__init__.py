"""kvstate: live state of pipeline operations in a NATS JetStream KV bucket.

The public API is re-exported here; ``tests/test_public_api.py`` pins it.
"""

from kvstate._kv import BucketConfig
from kvstate.client import Client, Revision
from kvstate.errors import (
    BucketError,
    BucketNotFound,
    ClientClosedError,
    ConfigurationError,
    ConflictError,
    ConnectionLostError,
    CorruptValue,
    InvalidKey,
    InvalidMetadata,
    InvalidPipeline,
    InvalidTransition,
    KvstateError,
    OperationExists,
    OperationNotFound,
    ServerVersionError,
    StaleUpdate,
    UnknownPipeline,
    UnknownStage,
    ValidationError,
    ValueTooLarge,
    WaitTimeout,
)
from kvstate.events import (
    Cancel,
    Event,
    FailStage,
    Heartbeat,
    MergeMetadata,
    Reopen,
    SkipStage,
    StartStage,
    SucceedStage,
)
from kvstate.machine import Decision, apply_event, derive_status, new_operation, ready_stages, stuck_stages
from kvstate.merge import merge_patch
from kvstate.model import (
    CancelInfo,
    Operation,
    OpStatus,
    Outcome,
    StageError,
    StageState,
    StageStatus,
    Transition,
    UpdateResult,
)
from kvstate.pipeline import Pipeline, StageSpec
from kvstate.settings import Settings
from kvstate.watch import Change, Watcher

__version__ = "0.1.0"

__all__ = [
    "BucketConfig",
    "BucketError",
    "BucketNotFound",
    "Cancel",
    "CancelInfo",
    "Change",
    "Client",
    "ClientClosedError",
    "ConfigurationError",
    "ConflictError",
    "ConnectionLostError",
    "CorruptValue",
    "Decision",
    "Event",
    "FailStage",
    "Heartbeat",
    "InvalidKey",
    "InvalidMetadata",
    "InvalidPipeline",
    "InvalidTransition",
    "KvstateError",
    "MergeMetadata",
    "OpStatus",
    "Operation",
    "OperationExists",
    "OperationNotFound",
    "Outcome",
    "Pipeline",
    "Reopen",
    "Revision",
    "ServerVersionError",
    "Settings",
    "SkipStage",
    "StageError",
    "StageSpec",
    "StageState",
    "StageStatus",
    "StaleUpdate",
    "StartStage",
    "SucceedStage",
    "Transition",
    "UnknownPipeline",
    "UnknownStage",
    "UpdateResult",
    "ValidationError",
    "ValueTooLarge",
    "WaitTimeout",
    "Watcher",
    "__version__",
    "apply_event",
    "derive_status",
    "merge_patch",
    "new_operation",
    "ready_stages",
    "stuck_stages",
]
