"""The NATS connection kvstate opens: nats-py's client with a faster header parser.

Every JetStream message kvstate reads carries headers: the expected-revision header its
writes store with each value, and a removal marker's operation, revision check and TTL.
nats-py 2.16 (without the optional ``fast-mail-parser``, which measured no faster) checks
each header name for whitespace with a generator over its characters, which was a fifth
of the archiver's CPU when it archived 20,000 operations in a burst. ``Connection`` parses
the same way with C-level string methods; ``tests/test_connection.py`` checks on arbitrary
input that both give the same result, so an upgrade of nats-py that changes the rules fails
there first.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS

__all__ = ["Connection"]

_CRLF = b"\r\n"


class Connection(NATS):
    """nats-py's ``Client``, but for how it parses a message's header lines."""

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        for line in raw.split(_CRLF):
            name, colon, value = line.partition(b":")
            if not colon:
                continue
            name = name.strip()
            if not name.isascii():
                continue  # not a token: nats-py skips it too
            key = name.decode("ascii")
            if key and key.split() != [key]:
                continue  # whitespace inside the name
            headers[key] = value.strip().decode("utf-8", "replace")
        return headers
