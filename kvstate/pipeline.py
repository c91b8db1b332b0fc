"""Pipeline definitions: stages, their dependencies (a DAG), attempts and deadlines.

A pipeline is defined in Python or in a TOML file::

    name = "orders"
    heartbeat_timeout = 30

    [[stages]]
    name = "ingest"

    [[stages]]
    name = "geo"
    after = ["ingest"]
    max_attempts = 5
    deadline = 10.0
    optional = true

and stored in the bucket under ``pipeline.<name>`` so the CLI and the dashboard know it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from kvstate.errors import InvalidPipeline, KvstateError, UnknownStage
from kvstate.keys import validate_id, validate_stage_name

__all__ = ["PIPELINE_SCHEMA_VERSION", "Pipeline", "StageSpec"]

PIPELINE_SCHEMA_VERSION = 1


class StageSpec(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """One stage of a pipeline.

    ``after`` names the stages that must finish first (succeeded, or optional and
    finished in any way). ``deadline`` is how many seconds one attempt may run before the
    dashboard calls it stuck. ``optional`` stages may be skipped or fail without failing
    the operation. ``retry_after`` is how long a failed attempt may wait for the next one,
    ``idle_after`` how long the stage may wait to be started once its dependencies are
    done, before either counts as stuck (the pipeline's values when unset; none: never).
    """

    name: str
    after: tuple[str, ...] = ()
    optional: bool = False
    max_attempts: int = 3
    deadline: float | None = None
    description: str = ""
    retry_after: float | None = None
    idle_after: float | None = None


class Pipeline(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    """A named DAG of stages. Validated on construction and on decoding."""

    name: str
    stages: tuple[StageSpec, ...]
    schema: int = PIPELINE_SCHEMA_VERSION
    heartbeat_timeout: float = 60.0
    description: str = ""
    retry_after: float | None = None
    """seconds a retrying stage may wait for its next attempt (stages may set their own)"""
    idle_after: float | None = None
    """seconds a ready stage may wait to be started (stages may set their own)"""
    sla: float | None = None
    """seconds from creation by which an operation should have finished"""

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, data: object) -> Pipeline:
        """Build a pipeline from plain data (parsed TOML or JSON); InvalidPipeline on errors."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise InvalidPipeline(f"pipeline definition rejected: {exc}") from exc

    @classmethod
    def from_toml(cls, source: str | Path) -> Pipeline:
        """Load a pipeline from a TOML file path, or from TOML text when given a str with newlines."""
        text = source if isinstance(source, str) and "\n" in source else Path(source).read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidPipeline(f"pipeline TOML is not valid: {exc}") from exc
        return cls.from_dict(data)

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Stage names in definition order."""
        return tuple(s.name for s in self.stages)

    def stage(self, name: str) -> StageSpec:
        """The spec of stage ``name``; UnknownStage when the pipeline has none."""
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise UnknownStage(name, self.name, self.stage_names)

    def has_stage(self, name: str) -> bool:
        """True when the pipeline defines stage ``name``."""
        return any(spec.name == name for spec in self.stages)

    def dependents(self, name: str) -> set[str]:
        """Every stage that depends on ``name``, directly or through others."""
        found: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for spec in self.stages:
                if current in spec.after and spec.name not in found:
                    found.add(spec.name)
                    frontier.append(spec.name)
        return found

    def layers(self) -> list[list[str]]:
        """Stages grouped by depth: stages in one layer can run in parallel."""
        depth: dict[str, int] = {}
        for spec in self.stages:  # stages are validated to be in topological order
            depth[spec.name] = 1 + max((depth[d] for d in spec.after), default=-1)
        result: list[list[str]] = [[] for _ in range(max(depth.values(), default=-1) + 1)]
        for spec in self.stages:
            result[depth[spec.name]].append(spec.name)
        return result


def _validate(pipeline: Pipeline) -> None:
    try:
        validate_id(pipeline.name, "pipeline name")
        for spec in pipeline.stages:
            validate_stage_name(spec.name)
    except KvstateError as exc:
        raise InvalidPipeline(str(exc)) from exc
    if not pipeline.stages:
        raise InvalidPipeline(f"pipeline {pipeline.name!r} has no stages")
    if pipeline.heartbeat_timeout <= 0:
        raise InvalidPipeline("heartbeat_timeout must be positive")
    for field_name in ("retry_after", "idle_after", "sla"):
        value = getattr(pipeline, field_name)
        if value is not None and not value > 0:
            raise InvalidPipeline(f"{field_name} must be positive")
    seen: set[str] = set()
    names = {s.name for s in pipeline.stages}
    for spec in pipeline.stages:
        _validate_stage(spec, seen, names)
        seen.add(spec.name)


def _validate_stage(spec: StageSpec, seen: set[str], names: set[str]) -> None:
    """One stage's fields, and its dependencies against the stages listed before it (``seen``)."""
    if spec.name in seen:
        raise InvalidPipeline(f"stage {spec.name!r} is defined twice")
    if spec.max_attempts < 1:
        raise InvalidPipeline(f"stage {spec.name!r}: max_attempts must be at least 1")
    for field_name in ("deadline", "retry_after", "idle_after"):
        value = getattr(spec, field_name)
        if value is not None and not value > 0:
            raise InvalidPipeline(f"stage {spec.name!r}: {field_name} must be positive")
    for dep in spec.after:
        if dep == spec.name:
            raise InvalidPipeline(f"stage {spec.name!r} depends on itself")
        if dep not in names:
            raise InvalidPipeline(f"stage {spec.name!r} depends on unknown stage {dep!r}")
        if dep not in seen:
            raise InvalidPipeline(
                f"stage {spec.name!r} depends on {dep!r}, which is defined after it "
                "(list stages in dependency order; cycles are not allowed)"
            )
