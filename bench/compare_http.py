"""A minimal HTTP/1.1 keep-alive client for the baseline's workers.

httpx's AsyncClient spent about 2 ms of client CPU per request at 100 connections on
the 2-core benchmark machine, more than the service and PostgreSQL together, so it
measured httpx instead of the design. This client does the least a client can do
(pooled keep-alive connections, Content-Length bodies only), which puts the cost where
it belongs and favours the baseline.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["HttpError", "HttpPool"]


class HttpError(Exception):
    """A non-2xx answer or a malformed response."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body


_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HttpPool:
    """Keep-alive connections to one loopback server, at most ``size`` at once."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self._host = host
        self._port = port
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(size)

    async def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """Send one request and return the response body; HttpError unless the status is 2xx."""
        async with self._slots:
            request = self._encode(method, path, body)
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await asyncio.open_connection(self._host, self._port)
            try:
                status, keep_alive, payload = await self._exchange(conn, request)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                # A kept-alive connection the server closed while idle fails before any byte of an
                # answer; send once more on a fresh connection (what every HTTP client does).
                if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                    raise
                conn = await asyncio.open_connection(self._host, self._port)
                status, keep_alive, payload = await self._exchange(conn, request)
            if keep_alive:
                self._idle.append(conn)
            else:
                conn[1].close()
        if not 200 <= status < 300:
            raise HttpError(status, payload)
        return payload

    def _encode(self, method: str, path: str, body: bytes | None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self._host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        return head.encode() + b"\r\n" + (body or b"")

    async def _exchange(self, conn: _Connection, request: bytes) -> tuple[int, bool, bytes]:
        reader, writer = conn
        try:
            writer.write(request)
            return await self._response(reader)
        except BaseException:
            writer.close()
            raise

    @staticmethod
    async def _response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            raise HttpError(0, raw) from None
        length, keep_alive = None, True
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                keep_alive = False
        if length is None:
            raise HttpError(status, b"response without Content-Length")
        return status, keep_alive, await reader.readexactly(length)

    async def aclose(self) -> None:
        """Close every idle connection."""
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
