"""Helpers of the NATS security tests: certificate files, server configuration pieces, NATS JWTs."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys

ROOT = Path(__file__).resolve().parents[2]
AUTH_CONF = ROOT / "deploy" / "nats" / "auth.conf"
ROLES = ("operator", "service", "writer", "archiver", "dashboard")
BUCKET = "operations"  # the bucket deploy/nats/auth.conf names


@dataclass(frozen=True)
class Pki:
    """PEM files of the test's certificate authority and the certificates it issued."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """a CA that signed nothing the server uses"""
    other_client_cert: Path
    other_client_key: Path
    """a client certificate the server's CA did not sign"""


def include_line(config_dir: Path, target: Path) -> str:
    """An ``include`` of ``target`` from a configuration in ``config_dir`` (nats-server includes are relative)."""
    return f'include "{os.path.relpath(target, config_dir)}"'


def tls_block(pki: Pki, *, verify: bool = False, extra: str = "") -> str:
    lines = [
        "tls {",
        f'  cert_file: "{pki.server_cert}"',
        f'  key_file: "{pki.server_key}"',
        f'  ca_file: "{pki.ca}"',
        f"  verify: {'true' if verify else 'false'}",
        "  timeout: 2",
        extra,
        "}",
    ]
    return "\n".join(line for line in lines if line)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def jwt(subject: str, issuer: nkeys.KeyPair, name: str, claims: dict[str, object]) -> str:
    """A NATS JWT (ed25519-nkey) for ``subject`` signed by ``issuer``: what nsc would write."""
    body: dict[str, object] = {
        "jti": "",
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": claims,
    }
    digest = hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).digest()
    body["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(body).encode())
    return f"{head}.{payload}.{_b64(issuer.sign(f'{head}.{payload}'.encode()))}"


@dataclass(frozen=True)
class Decentralized:
    """An operator-mode server configuration and a user's creds file for it."""

    server_config: str
    creds: Path
    user_public_key: str
