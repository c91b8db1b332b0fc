"""Encoding and decoding of bucket values. One encoder and one decoder per type, made once."""

from __future__ import annotations

import msgspec

from kvstate.errors import CorruptValue, InvalidMetadata, InvalidPipeline, ValueTooLarge
from kvstate.jobs import JOB_SCHEMA, Job
from kvstate.keys import JOB_PREFIX, operation_id_from_key
from kvstate.model import SCHEMA_VERSION, JSONObject, Operation
from kvstate.pipeline import Pipeline

__all__ = [
    "decode_job",
    "decode_operation",
    "decode_pipeline",
    "encode_job",
    "encode_operation",
    "encode_pipeline",
    "normalize_json_object",
]

_encoder = msgspec.json.Encoder()
_operation_decoder = msgspec.json.Decoder(Operation)
_pipeline_decoder = msgspec.json.Decoder(Pipeline)
_job_decoder = msgspec.json.Decoder(Job)
_any_decoder = msgspec.json.Decoder()


def encode_operation(op: Operation, max_size: int | None = None) -> bytes:
    """The stored JSON of ``op`` (without its revision); ValueTooLarge above ``max_size``."""
    if op.revision:
        op = msgspec.structs.replace(op, revision=0)
    try:
        data = _encoder.encode(op)
    except (TypeError, ValueError) as exc:
        raise InvalidMetadata(f"operation {op.id!r} holds a value that is not JSON: {exc}") from exc
    if max_size is not None and len(data) > max_size:
        raise ValueTooLarge("op." + op.id, len(data), max_size)
    return data


def decode_operation(key: str, revision: int, data: bytes) -> Operation:
    """The operation stored at ``key``/``revision``; CorruptValue when it is not one."""
    try:
        op = _operation_decoder.decode(data)
    except msgspec.DecodeError as exc:  # includes msgspec.ValidationError
        raise CorruptValue(key, revision, str(exc), data) from exc
    expected = operation_id_from_key(key)
    if expected is not None and op.id != expected:
        raise CorruptValue(key, revision, f"value has id {op.id[:64]!r}, key says {expected!r}", data)
    if op.schema > SCHEMA_VERSION:
        # Read as this version, it would be written back without what the newer one added.
        raise CorruptValue(
            key, revision, f"written in schema {op.schema} by a newer kvstate; this one reads {SCHEMA_VERSION}", data
        )
    return msgspec.structs.replace(op, revision=revision)


def encode_job(job: Job, max_size: int | None = None) -> bytes:
    """The stored JSON of ``job`` (without its revision); ValueTooLarge above ``max_size``."""
    if job.revision:
        job = msgspec.structs.replace(job, revision=0)
    data = _encoder.encode(job)
    if max_size is not None and len(data) > max_size:
        raise ValueTooLarge(JOB_PREFIX + job.id, len(data), max_size)
    return data


def decode_job(key: str, revision: int, data: bytes) -> Job:
    """The job stored at ``key``/``revision``; CorruptValue when it is not one (or of a newer schema)."""
    try:
        job = _job_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptValue(key, revision, str(exc), data) from exc
    if key.startswith(JOB_PREFIX) and job.id != key[len(JOB_PREFIX) :]:
        raise CorruptValue(key, revision, f"value has id {job.id[:64]!r}, key says {key[len(JOB_PREFIX) :]!r}", data)
    if job.schema > JOB_SCHEMA:
        raise CorruptValue(key, revision, f"a job of schema {job.schema}; this kvstate reads {JOB_SCHEMA}", data)
    return msgspec.structs.replace(job, revision=revision)


def encode_pipeline(pipeline: Pipeline) -> bytes:
    """The stored JSON of a pipeline definition."""
    return _encoder.encode(pipeline)


def decode_pipeline(key: str, revision: int, data: bytes) -> Pipeline:
    """The pipeline stored at ``key``; CorruptValue when it is not valid."""
    try:
        return _pipeline_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise CorruptValue(key, revision, str(exc), data) from exc
    except InvalidPipeline as exc:
        raise CorruptValue(key, revision, str(exc), data) from exc


def normalize_json_object(value: object, what: str = "metadata") -> JSONObject:
    """``value`` as plain JSON (what a reader will get back); InvalidMetadata when it is not."""
    if not isinstance(value, dict):
        raise InvalidMetadata(f"{what} must be a JSON object (a dict), got {type(value).__name__}")
    try:
        normalized = _any_decoder.decode(_encoder.encode(value))
    except (TypeError, ValueError, msgspec.DecodeError) as exc:
        raise InvalidMetadata(f"{what} is not JSON-serialisable: {exc}") from exc
    if not isinstance(normalized, dict):  # keys that are not strings would land here
        raise InvalidMetadata(f"{what} must be a JSON object")
    return normalized
