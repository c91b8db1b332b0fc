"""Settings, built once per process at the edge from an environment mapping.

Nothing else in kvstate reads ``os.environ``. ``Settings.from_env(os.environ)`` parses
the variables below; every one has a documented default (README, docs/operations.md).
"""

from __future__ import annotations

import base64
import binascii
import importlib.util
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TypeVar

from kvstate.errors import ConfigurationError
from kvstate.keys import validate_id

__all__ = [
    "SettingSpec",
    "Settings",
    "env_value",
    "env_variables",
    "environ_with",
    "flag",
    "from_environ",
    "non_negative_float",
    "positive_float",
    "positive_int",
    "redact_url",
    "redacted_repr",
    "setting",
    "setting_specs",
    "settings_table",
    "tcp_port",
]

T = TypeVar("T")


def env_value(environ: Mapping[str, str], name: str, default: T, convert: Callable[[str], T]) -> T:
    """``convert(environ[name])``, or ``default`` when unset or blank.

    A value ``convert`` rejects (ValueError) becomes a ConfigurationError naming the
    variable (the value itself only with its passwords masked, and not at all for a
    variable named like a secret). Every settings class of the project parses its
    variables with this.
    """
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return convert(raw.strip())
    except ValueError as exc:
        shown = "(hidden)" if _SECRET_FIELD.search(name) else repr(redact_url(raw))
        raise ConfigurationError(f"{name}={shown} is not valid: {exc}") from exc


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


def flag(raw: str) -> bool:
    """A yes/no switch: 1, true, yes, on or 0, false, no, off (any case)."""
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false (1/0, yes/no, on/off)")


def _replicas(raw: str) -> int:
    value = int(raw)
    if value not in (1, 3, 5):
        raise ValueError("replicas must be 1, 3 or 5")
    return value


_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*")


def _inbox_prefix(raw: str) -> str:
    if _SUBJECT_PREFIX.fullmatch(raw) is None:
        raise ValueError("a subject prefix is dot-separated tokens of A-Z a-z 0-9 _ - $ (no wildcards)")
    return raw


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
    secret: bool = False
    """a password or token: left out of the settings' repr"""


_SPEC = "kvstate.setting"


def setting(
    env: str,
    default: T,
    parse: Callable[[str], T],
    doc: str,
    *,
    shown_default: str | None = None,
    secret: bool = False,
) -> T:
    """Declare a settings field once: its variable, default, parser and meaning.

    ``from_environ`` reads it, ``env_variables`` lists it and ``settings_table`` renders
    the docs' row for it, all from this one declaration. A ``secret`` is never shown by
    the settings' repr.
    """
    spec = SettingSpec(env, parse, doc, shown_default, secret)
    return field(default=default, repr=not secret, metadata={_SPEC: spec})


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


_MASK = "***"
_TOKEN_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
"""schemes whose URL user without a password is a token (nats-py sends it as ``auth_token``)"""
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:password|passwd|pass|pwd|sslpassword|token|auth_token|secret)=)[^&;#]*")
_SECRET_KEYWORD = re.compile(r"(?i)(\b(?:password|passwd|pass|pwd|sslpassword|token)\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_MASKED = rf"\g<1>{_MASK}"
_SECRET_FIELD = re.compile(r"password|passwd|token|secret", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with every password and token masked, for logs, errors and files others may read.

    ``nats://user:***@host:4222``, ``nats://***@host`` (a NATS URL's lone user is a token),
    ``postgresql://kvstate:***@db/kvstate?sslpassword=***``, a comma-separated list URL by URL,
    and a libpq keyword string's ``password=***``. When in doubt it masks more, never less.
    """
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _SECRET_KEYWORD.sub(_MASKED, url)
    at = rest.rfind("@")  # the last one: a password may hold an unescaped "@"
    if at >= 0:
        user, colon, _ = rest[:at].partition(":")
        if colon:
            userinfo = f"{user}:{_MASK}"
        elif scheme.strip().lower() in _TOKEN_SCHEMES:
            userinfo = _MASK
        else:
            userinfo = user
        rest = f"{userinfo}@{rest[at + 1 :]}"
    return f"{scheme}://{_SECRET_QUERY.sub(_MASKED, rest)}"


def redacted_repr(self: object) -> str:
    """The repr of a settings dataclass that shows no secret (use as ``__repr__ = redacted_repr``).

    Fields declared ``secret`` (or with ``repr=False``) are left out, fields named like a
    secret (password, token, secret) show only whether they are set, URLs go through
    ``redact_url``; nested settings use their own repr.
    """
    parts = []
    for f in fields(self):  # type: ignore[arg-type]
        if not f.repr:
            continue
        value = getattr(self, f.name)
        if _SECRET_FIELD.search(f.name):
            shown = "None" if value is None else repr(_MASK)
        elif isinstance(value, str) and "://" in value:
            shown = repr(redact_url(value))
        else:
            shown = repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(self).__name__}({', '.join(parts)})"


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
    nats_user: str | None = setting(
        "NATS_USER", None, str, "NATS user name, with `NATS_PASSWORD` (rather than a `user:password@` in `NATS_URL`)"
    )
    nats_password: str | None = setting(
        "NATS_PASSWORD", None, str, "password of `NATS_USER` (a secret: never logged or shown)", secret=True
    )
    nats_token: str | None = setting(
        "NATS_TOKEN", None, str, "NATS authentication token (a secret: never logged or shown)", secret=True
    )
    nats_creds: Path | None = setting(
        "NATS_CREDS",
        None,
        Path,
        "credentials file (user JWT and nkey seed, as `nsc generate creds` writes it) for NATS decentralized auth",
    )
    nats_nkey_seed: Path | None = setting(
        "NATS_NKEY_SEED", None, Path, "file holding a user nkey seed (`SU...`) for NATS nkey authentication"
    )
    nats_tls_ca: Path | None = setting(
        "NATS_TLS_CA",
        None,
        Path,
        "CA certificate(s) (PEM) to verify the NATS server with, instead of the system's; any TLS setting "
        "(or a `tls://` URL) makes TLS required",
    )
    nats_tls_cert: Path | None = setting(
        "NATS_TLS_CERT",
        None,
        Path,
        "client certificate (PEM) for servers that verify clients (mTLS), with `NATS_TLS_KEY`",
    )
    nats_tls_key: Path | None = setting("NATS_TLS_KEY", None, Path, "private key (PEM) of `NATS_TLS_CERT`")
    nats_tls_first: bool = setting(
        "NATS_TLS_FIRST",
        False,
        flag,
        "start TLS before the server's greeting: for a server with `handshake_first` in its `tls` block",
        shown_default="`false`",
    )
    nats_inbox_prefix: str = setting(
        "NATS_INBOX_PREFIX",
        "_INBOX",
        _inbox_prefix,
        "subject prefix of this process's reply inboxes; give each role its own (`_INBOX_service`) so that "
        "its permissions can keep others' replies from it ([security](security.md#nats-roles-and-permissions))",
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

    __repr__ = redacted_repr

    def __post_init__(self) -> None:
        if not 1 <= self.history <= 64:
            raise ConfigurationError(f"KVSTATE_HISTORY={self.history}: must be between 1 and 64")
        if self.max_value_size < 1024:
            raise ConfigurationError(f"KVSTATE_MAX_VALUE_SIZE={self.max_value_size}: must be at least 1024")
        _check_nats_security(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from an environment mapping (pass ``os.environ`` at the process edge)."""
        return from_environ(cls, environ)

    @property
    def servers(self) -> list[str]:
        """NATS_URL split into the server list nats-py takes."""
        return [url.strip() for url in self.nats_url.split(",") if url.strip()]

    @property
    def nats_url_redacted(self) -> str:
        """NATS_URL with any password or token masked: the one to log or put in an error."""
        return redact_url(self.nats_url)

    @property
    def tls_required(self) -> bool:
        """True when the connection must be TLS: a ``tls://`` URL, or any ``NATS_TLS_*`` setting."""
        wanted = (self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)
        return (
            self.nats_tls_first
            or any(path is not None for path in wanted)
            or any(url.lower().startswith("tls://") for url in self.servers)
        )


def _check_nats_security(settings: Settings) -> None:
    """The NATS authentication and TLS settings combine into one way to connect, and their files are usable."""
    in_url = any(_url_userinfo(url) for url in settings.servers)
    ways = [
        name
        for name, given in (
            ("NATS_CREDS", settings.nats_creds is not None),
            ("NATS_NKEY_SEED", settings.nats_nkey_seed is not None),
            ("NATS_USER/NATS_PASSWORD", settings.nats_user is not None or settings.nats_password is not None),
            ("NATS_TOKEN", settings.nats_token is not None),
            ("a user or token in NATS_URL", in_url),
        )
        if given
    ]
    if len(ways) > 1:
        raise ConfigurationError(f"NATS authentication is set more than one way ({', '.join(ways)}): choose one")
    if (settings.nats_user is None) != (settings.nats_password is None):
        raise ConfigurationError("NATS_USER and NATS_PASSWORD go together: set both or neither")
    if (settings.nats_tls_cert is None) != (settings.nats_tls_key is None):
        raise ConfigurationError("NATS_TLS_CERT and NATS_TLS_KEY go together: a client certificate needs its key")
    files = (
        ("NATS_CREDS", settings.nats_creds),
        ("NATS_NKEY_SEED", settings.nats_nkey_seed),
        ("NATS_TLS_CA", settings.nats_tls_ca),
        ("NATS_TLS_CERT", settings.nats_tls_cert),
        ("NATS_TLS_KEY", settings.nats_tls_key),
    )
    for env, path in files:
        if path is not None:
            _check_readable(env, path)
    nkey_auth = settings.nats_creds is not None or settings.nats_nkey_seed is not None
    if nkey_auth and importlib.util.find_spec("nkeys") is None:
        raise ConfigurationError("NATS_CREDS and NATS_NKEY_SEED need the nkeys package: pip install 'kvstate[nkeys]'")
    if settings.nats_creds is not None:
        _check_creds(settings.nats_creds)
    if settings.nats_nkey_seed is not None:
        _check_seed("NATS_NKEY_SEED", settings.nats_nkey_seed, settings.nats_nkey_seed.read_bytes())


def _url_userinfo(url: str) -> str:
    """The ``user[:password]`` part of a server URL ("" when it has none)."""
    _, sep, rest = url.partition("://")
    if not sep:
        return ""
    authority = rest.split("/", 1)[0]
    at = authority.rfind("@")
    return authority[:at] if at >= 0 else ""


def _check_readable(env: str, path: Path) -> None:
    if not path.is_file():
        raise ConfigurationError(f"{env}={str(path)!r}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"{env}={str(path)!r}: the file is not readable by this process")


_CREDS_SECTION = re.compile(rb"-{3,}\s*BEGIN ([A-Z ]+?)\s*-{3,}\r?\n\s*(\S+)")


def _check_creds(path: Path) -> None:
    """A credentials file holds a user JWT and a user nkey seed, each in its armoured section.

    nats-py 2.16 reads the JWT line by line until it finds its section, with no end at the
    end of the file, synchronously in the event loop: a file with a seed and no JWT hangs
    the whole process (checked), so such a file is refused here with the reason.
    """
    sections = {name.decode(): value for name, value in _CREDS_SECTION.findall(path.read_bytes())}
    jwt = sections.get("NATS USER JWT")
    if jwt is None:
        raise ConfigurationError(f"NATS_CREDS={str(path)!r}: no -----BEGIN NATS USER JWT----- section")
    problem = _jwt_problem(jwt)
    if problem:
        raise ConfigurationError(f"NATS_CREDS={str(path)!r}: the user JWT {problem}")
    seed = sections.get("USER NKEY SEED")
    if seed is None:
        raise ConfigurationError(f"NATS_CREDS={str(path)!r}: no -----BEGIN USER NKEY SEED----- section")
    _check_seed("NATS_CREDS", path, seed)


def _jwt_problem(token: bytes) -> str:
    parts = token.split(b".")
    if len(parts) != 3:
        return "is not a JWT (three dot-separated parts)"
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + b"=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return "has claims that are not base64url JSON"
    if not isinstance(claims, dict) or not str(claims.get("sub", "")).startswith("U"):
        return "is not a user JWT (its subject is not a user public key, U...)"
    return ""


def _check_seed(env: str, path: Path, raw: bytes) -> None:
    import nkeys  # checked importable above; the optional extra kvstate[nkeys]

    seed = bytearray(raw.strip())
    try:
        if not seed.startswith(b"SU"):
            raise ConfigurationError(f"{env}={str(path)!r}: holds no user nkey seed (SU...)")
        try:
            nkeys.from_seed(seed).wipe()
        except Exception as exc:  # noqa: BLE001 - nkeys raises its own classes for each kind of bad seed
            raise ConfigurationError(
                f"{env}={str(path)!r}: the nkey seed is not valid ({type(exc).__name__})"
            ) from None
    finally:
        seed[:] = bytes(len(seed))  # best effort, as nats-py does: no copy of the seed left behind


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
