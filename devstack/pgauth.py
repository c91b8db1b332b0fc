"""Passwords of the PostgreSQL that ``kvstate up`` starts: generated once, kept 0600, never sent in clear.

``kvstate up`` keeps one password per role in ``$KVSTATE_STATE_DIR/pgpass``, in libpq's
password-file format (``127.0.0.1:*:*:role:password`` a line), so that

    PGPASSFILE=.state/pgpass psql -h 127.0.0.1 -p 5432 -U kvstate kvstate

works as is. The file is created with mode 0600 by ``os.open`` (never readable by others,
not even for a moment) and reused by every later run on the same state folder. Roles get
their password as a SCRAM-SHA-256 verifier (``scram_verifier``), so the clear text reaches
no server log, not even in the statement PostgreSQL logs beside an error.

Standard library only: ``devstack.servers`` uses it too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

__all__ = [
    "PASSWORD_HOST",
    "load_passwords",
    "postgres_url",
    "scram_verifier",
    "write_private",
]

PASSWORD_HOST = "127.0.0.1"
"""the host the password-file lines name (the local servers listen on it only)"""
_SCRAM_ITERATIONS = 4096  # PostgreSQL's own default (scram_iterations)


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = _SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, RFC 7677).

    ``CREATE ROLE r PASSWORD '<verifier>'`` stores it as given: the server never sees the
    password. Printable ASCII only (our generated passwords), where SASLprep changes nothing.
    """
    if not password or not all(" " < c <= "~" for c in password):
        raise ValueError("the password must be printable ASCII without spaces")
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, mode 0600 from its creation (a temporary file renamed over it)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _fields(line: str) -> list[str]:
    """The colon-separated fields of a password-file line (``\\:`` and ``\\\\`` escaped)."""
    fields: list[str] = []
    current: list[str] = []
    escaped = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":" and len(fields) < 4:
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def _read(path: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _fields(line)
        if len(fields) == 5 and fields[0] == PASSWORD_HOST and fields[4]:
            found.setdefault(fields[3], fields[4])
    return found


def load_passwords(path: Path, roles: Sequence[str]) -> dict[str, str]:
    """The password of each of ``roles`` from the password file ``path``, generating the missing ones.

    A new file, or one that lacked a role, is (re)written 0600 with every role; a file that
    others could read is narrowed to 0600 first (libpq ignores such a file).
    """
    passwords: dict[str, str] = {}
    if path.exists():
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        passwords = _read(path)
    missing = [role for role in roles if role not in passwords]
    if missing:
        for role in missing:
            passwords[role] = secrets.token_urlsafe(24)
        lines = ["# kvstate up: passwords of the local PostgreSQL (libpq password file; PGPASSFILE=this psql ...)"]
        lines += [f"{PASSWORD_HOST}:*:*:{role}:{password}" for role, password in passwords.items()]
        write_private(path, "\n".join(lines) + "\n")
    return {role: passwords[role] for role in roles}


def postgres_url(user: str, password: str | None, port: int, database: str, host: str = PASSWORD_HOST) -> str:
    """``postgresql://user:password@host:port/database``, the password percent-encoded (left out when None)."""
    credentials = quote(user, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return f"postgresql://{credentials}@{host}:{port}/{database}"
