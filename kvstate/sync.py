"""A synchronous client for code that is not asyncio: Celery tasks, Flask or Django views, scripts.

    from kvstate.sync import SyncClient

    with SyncClient(Settings.from_env(os.environ)) as kv:
        op = kv.create("orders", metadata={"order_id": "A-1001"})
        kv.start(op.id, "ingest", worker="ingest-1", event_id="msg-17:start")
        kv.succeed(op.id, "ingest", event_id="msg-17:done")

It has the methods of the async ``Client`` with the same arguments, results and errors
(``watch`` aside: ``wait`` blocks until an operation finishes),
and runs them on one event loop per process, in a daemon thread of its own (``_Runtime``).
So it is thread-safe: any number of threads may share one ``SyncClient``, and their
concurrent updates of one operation share one compare-and-set as they do in async code.

It is safe across ``fork()`` (Celery's prefork pool, gunicorn's workers): a child never
touches the connection or the loop thread it inherited (neither works after a fork);
its first call opens a connection of its own, and its exit closes only that.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Concatenate, ParamSpec, Self, TypeVar

from kvstate.client import Client
from kvstate.errors import ClientClosedError
from kvstate.settings import Settings

__all__ = ["SyncClient"]

P = ParamSpec("P")
R = TypeVar("R")


class _Runtime:
    """The one event loop of this process, run by a daemon thread, started on first use."""

    _lock = threading.Lock()
    _current: _Runtime | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kvstate-sync-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> _Runtime:
        """This process's runtime (a forked child gets a new one, never its parent's)."""
        with cls._lock:
            runtime = cls._current
            if runtime is None or runtime.pid != os.getpid():
                runtime = cls._current = _Runtime()
            return runtime

    @classmethod
    def forget_after_fork(cls) -> None:
        """In a forked child: the parent's loop thread does not exist here, so drop it unused,
        and renew the locks another parent thread may have held while forking."""
        cls._lock = threading.Lock()
        cls._current = None
        for client in list(_instances):
            client._lock = threading.Lock()

    def run(self, coro: Coroutine[object, object, R]) -> R:
        """Run ``coro`` on the loop and wait for its result in the calling thread."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SyncClient called from its own event loop thread: use the async Client there")
        future: Future[R] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result()


_instances: weakref.WeakSet[SyncClient] = weakref.WeakSet()
os.register_at_fork(after_in_child=_Runtime.forget_after_fork)


def _blocking(method: Callable[Concatenate[Client, P], Awaitable[R]]) -> Callable[Concatenate[SyncClient, P], R]:
    """The synchronous form of an async ``Client`` method: same arguments, result and errors."""

    def call(self: SyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        async def invoke(client: Client) -> R:
            return await method(client, *args, **kwargs)

        return self._call(invoke)

    call.__name__ = method.__name__
    call.__qualname__ = f"SyncClient.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class SyncClient:
    """The kvstate client for synchronous code; use it as a context manager.

    It refuses use before ``__enter__`` and after ``__exit__`` (ClientClosedError), like
    the async client. The arguments are those of ``Client`` (no ``nc``: the connection
    belongs to the client's loop).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        create_bucket: bool = False,
        name: str = "kvstate-sync",
        cache_size: int = 10_000,
    ) -> None:
        self.settings = settings or Settings()
        self._create_bucket = create_bucket
        self._name = name
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._pid = 0
        self._entered = False
        self._closed = False
        _instances.add(self)

    def __enter__(self) -> Self:
        if self._entered:
            raise ClientClosedError("a kvstate SyncClient cannot be reopened")
        self._entered = True
        self._connected()  # fail here, not at the first call, when NATS or the bucket is missing
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish queued writes and close this process's connection (a parent's is left to the parent)."""
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
            mine = client is not None and self._pid == os.getpid()
        if client is not None and mine:
            _Runtime.get().run(client.close())

    def _connected(self) -> Client:
        """This process's open async client, opened on first use (again in a forked child)."""
        with self._lock:
            if not self._entered or self._closed:
                raise ClientClosedError("use the kvstate SyncClient inside `with SyncClient(...) as kv:`")
            pid = os.getpid()
            if self._client is None or self._pid != pid:
                client = Client(
                    self.settings, create_bucket=self._create_bucket, name=self._name, cache_size=self._cache_size
                )
                self._client = _Runtime.get().run(_opened(client))
                self._pid = pid
            return self._client

    def _call(self, invoke: Callable[[Client], Awaitable[R]]) -> R:
        client = self._connected()
        return _Runtime.get().run(_awaited(invoke(client)))

    @property
    def stats(self) -> dict[str, int]:
        """The async client's counters (writes, conflicts, transient retries, cached revisions)."""
        return self._connected().stats

    set_pipeline = _blocking(Client.set_pipeline)
    pipeline = _blocking(Client.pipeline)
    refresh_pipeline = _blocking(Client.refresh_pipeline)
    pipelines = _blocking(Client.pipelines)
    create = _blocking(Client.create)
    get = _blocking(Client.get)
    apply = _blocking(Client.apply)
    update = _blocking(Client.update)
    start = _blocking(Client.start)
    heartbeat = _blocking(Client.heartbeat)
    succeed = _blocking(Client.succeed)
    fail = _blocking(Client.fail)
    skip = _blocking(Client.skip)
    merge_metadata = _blocking(Client.merge_metadata)
    cancel = _blocking(Client.cancel)
    reopen = _blocking(Client.reopen)
    remove = _blocking(Client.remove)
    wait = _blocking(Client.wait)
    history = _blocking(Client.history)
    raw = _blocking(Client.raw)

    list = _blocking(Client.list)


async def _opened(client: Client) -> Client:
    await client.__aenter__()
    return client


async def _awaited(awaitable: Awaitable[R]) -> R:
    return await awaitable
