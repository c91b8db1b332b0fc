"""Settings, built once per process at the edge from an environment mapping.

Nothing else in kvstate reads ``os.environ``. ``Settings.from_env(os.environ)`` parses
the variables below; every one has a documented default (README, docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TypeVar

from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id

__all__ = [
    "SettingSpec",
    "Settings",
    "env_value",
    "env_variables",
    "environ_with",
    "from_environ",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "setting",
    "setting_specs",
    "settings_table",
    "tcp_port",
]

T = TypeVar("T")


def env_value(environ: Mapping[str, str], name: str, default: T, convert: Callable[[str], T]) -> T:
    """``convert(environ[name])``, or ``default`` when unset or blank.

    A value ``convert`` rejects (ValueError) becomes a ConfigurationError naming the
    variable. Every settings class of the project parses its variables with this.
    """
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return convert(raw.strip())
    except ValueError as exc:
        raise ConfigurationError(f"{name}={raw!r} is not valid: {exc}") from exc


def positive_int(raw: str) -> int:
    """An integer of at least 1."""
    value = int(raw)
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def positive_float(raw: str) -> float:
    """A number above 0."""
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def non_negative_float(raw: str) -> float:
    """A number of at least 0."""
    value = float(raw)
    if not value >= 0:
        raise ValueError("must be zero or a positive number")
    return value


def tcp_port(raw: str) -> int:
    """A TCP port, 0-65535 (0 where the caller allows "off" or "any")."""
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _replicas(raw: str) -> int:
    value = int(raw)
    if value not in (1, 3, 5):
        raise ValueError("replicas must be 1, 3 or 5")
    return value


def _bucket(raw: str) -> str:
    try:
        return validate_id(raw, "bucket name")
    except Exception as exc:
        raise ValueError(str(exc)) from exc


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """How one settings field is read: its variable, its parser and what it means (the docs' words)."""

    env: str
    parse: Callable[[str], object]
    doc: str
    shown_default: str | None = None
    """the default as the docs table shows it, when ``repr`` of the value is not what a reader wants"""


_SPEC = "kvstate.setting"


def setting(env: str, default: T, parse: Callable[[str], T], doc: str, *, shown_default: str | None = None) -> T:
    """Declare a settings field once: its variable, default, parser and meaning.

    ``from_environ`` reads it, ``env_variables`` lists it and ``settings_table`` renders
    the docs' row for it, all from this one declaration.
    """
    spec = SettingSpec(env, parse, doc, shown_default)
    return field(default=default, metadata={_SPEC: spec})


def setting_specs(settings_type: type) -> dict[str, SettingSpec]:
    """The declared settings of a settings dataclass, by field name, in declaration order."""
    return {f.name: f.metadata[_SPEC] for f in fields(settings_type) if _SPEC in f.metadata}


S = TypeVar("S")


def from_environ(settings_type: type[S], environ: Mapping[str, str], **given: object) -> S:
    """An instance of ``settings_type`` from ``environ``: each declared field from its variable
    (the default when unset or blank), ``given`` fields as passed (nested settings, overrides)."""
    values: dict[str, object] = {}
    for f in fields(settings_type):  # type: ignore[arg-type]
        spec = f.metadata.get(_SPEC)
        if spec is not None and f.name not in given:
            values[f.name] = env_value(environ, spec.env, f.default, spec.parse)
    values.update(given)
    return settings_type(**values)


def environ_with(environ: Mapping[str, str], options: Mapping[str, object | None]) -> dict[str, str]:
    """``environ`` with command-line ``options`` laid over it, by variable name.

    The one way a command applies its options over the environment: an option left unset
    (None or "") keeps what the environment says, a given one replaces its variable, and the
    settings class then parses and checks both alike (``from_env`` of the result).
    """
    merged = dict(environ)
    merged.update({name: str(value) for name, value in options.items() if value is not None and value != ""})
    return merged


def settings_table(settings_type: type) -> str:
    """The markdown rows of docs/operations.md#configuration for ``settings_type``."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(settings_type):
        spec = f.metadata.get(_SPEC)
        if spec is None:
            continue
        shown = spec.shown_default if spec.shown_default is not None else _shown(f.default)
        rows.append(f"| `{spec.env}` | {shown} | {spec.doc} |")
    return "\n".join(rows)


def _shown(default: object) -> str:
    if default is None or default == "":
        return "(unset)"
    return f"`{default}`"


@dataclass(frozen=True)
class Settings:
    """Connection and bucket settings of the kvstate client.

    Each field is declared once with ``setting``: its variable, default, parser and
    meaning; docs/operations.md#configuration holds the table ``settings_table`` renders
    from these declarations (a test keeps the two equal).
    """

    nats_url: str = setting(
        "NATS_URL",
        "nats://127.0.0.1:4222",
        str,
        "NATS server(s), comma-separated; for `kvstate up`: use this server instead of starting one",
    )
    bucket: str = setting("KVSTATE_BUCKET", "operations", _bucket, "the KV bucket holding operations")
    replicas: int = setting("KVSTATE_REPLICAS", 1, _replicas, "bucket replicas when the bucket is created (1, 3 or 5)")
    history: int = setting(
        "KVSTATE_HISTORY", 1, positive_int, "revisions kept per key (1-64; [why 1](state-format.md#history))"
    )
    max_value_size: int = setting("KVSTATE_MAX_VALUE_SIZE", 262144, positive_int, "largest operation value, bytes")
    max_retries: int = setting(
        "KVSTATE_MAX_RETRIES", 25, positive_int, "compare-and-set attempts per update before ConflictError"
    )
    timeout: float = setting(
        "KVSTATE_TIMEOUT",
        5.0,
        positive_float,
        "seconds to wait for one NATS request (and for the first connection)",
    )
    deadline: float = setting(
        "KVSTATE_DEADLINE",
        30.0,
        positive_float,
        "seconds one call keeps retrying transient failures before it raises `ConnectionLostError`: a stream "
        'electing its leader ("no responders", 4-9 s after a leader dies), a timed-out write (re-read first, so '
        "an applied event counts as a duplicate), NATS reconnecting",
    )

    def __post_init__(self) -> None:
        if not 1 <= self.history <= 64:
            raise ConfigurationError(f"KVSTATE_HISTORY={self.history}: must be between 1 and 64")
        if self.max_value_size < 1024:
            raise ConfigurationError(f"KVSTATE_MAX_VALUE_SIZE={self.max_value_size}: must be at least 1024")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return from_environ(cls, environ)

    @property
    def servers(self) -> list[str]:
        """NATS_URL split into the server list nats-py takes."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]


def env_variables(settings_type: type) -> set[str]:
    """The environment variable names a settings class reads (for docs and their tests).

    Declared fields (``setting``) and, for classes not converted yet, an ``ENV`` mapping.
    """
    declared = {spec.env for spec in setting_specs(settings_type).values()}
    env: dict[str, str] = getattr(settings_type, "ENV", {})
    names = {f.name for f in fields(settings_type)}
    missing = set(env) - names
    if missing:
        raise ConfigurationError(f"{settings_type.__name__}.ENV names unknown fields: {sorted(missing)}")
    return declared | set(env.values())
