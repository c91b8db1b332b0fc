"""One demo run: the order generator, the ten services, the supervisor and the progress line.

    report = await run_demo(DemoSettings.from_env(os.environ), stop=stop_event)

Order of events: connect, store the pipeline, open the work queue, start the supervisor
(and wait for its first view of the bucket), start the services, generate orders at
``rate`` for ``duration`` seconds, wait up to ``drain_timeout`` for the live operations
to finish, then stop the services (running attempts get a short grace, unacknowledged
messages are redelivered to the next run) and close the connection. Setting ``stop``
skips to the shutdown at any point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from demo.errors import DemoError, QueueError
from demo.orders import Poison, random_order
from demo.queue import WorkItem, WorkQueue, close, connect
from demo.services import SERVICES
from demo.settings import DemoSettings
from demo.stats import DemoStats
from demo.supervisor import Supervisor
from demo.worker import Router, StageWorker
from kvstate import Client, KvstateError, Pipeline

__all__ = ["PIPELINE_FILE", "DemoReport", "load_pipeline", "run_demo"]

log = logging.getLogger("demo.runner")

PIPELINE_FILE = Path(__file__).with_name("pipeline.toml")
"""The demo pipeline: ingest -> validate -> {geo, fraud, profile} -> merge -> score -> persist -> {notify, audit}."""


def load_pipeline(path: Path = PIPELINE_FILE) -> Pipeline:
    """The pipeline in ``path``; DemoError when a stage has no simulated service."""
    pipeline = Pipeline.from_toml(path)
    missing = [name for name in pipeline.stage_names if name not in SERVICES]
    if missing:
        raise DemoError(f"the demo has no service for stage(s) {', '.join(missing)} (known: {', '.join(SERVICES)})")
    return pipeline


@dataclass(frozen=True, slots=True)
class DemoReport:
    """How a run ended: its counters, how long it took, whether every live operation finished."""

    stats: dict[str, int]
    elapsed: float
    drained: bool
    stopped: bool


async def run_demo(
    settings: DemoSettings,
    pipeline: Pipeline | None = None,
    *,
    stop: asyncio.Event | None = None,
    out: TextIO | None = None,
    services: Sequence[str] | None = None,
    progress_interval: float | None = None,
) -> DemoReport:
    """Run the demo until ``duration`` is over and the live operations drained, or ``stop`` is set.

    ``services`` limits the services run here (default: every stage), so several processes
    can share the work. ``out`` receives the progress line (none when None).
    """
    pipeline = pipeline or load_pipeline()
    chosen = list(services) if services else list(pipeline.stage_names)
    unknown = [name for name in chosen if not pipeline.has_stage(name)]
    if unknown:
        raise DemoError(f"no stage named {', '.join(unknown)} in pipeline {pipeline.name!r}")
    nc = await connect(settings.kv, "kvstate-demo")
    try:
        async with Client(settings.kv, nc=nc, create_bucket=True, name="kvstate-demo") as client:
            await client.set_pipeline(pipeline)
            queue = await WorkQueue.open(
                nc, settings.stream, settings.subject_prefix, timeout=settings.kv.timeout, replicas=settings.kv.replicas
            )
            run = _Run(client, queue, pipeline, settings, chosen, stop or asyncio.Event(), out, progress_interval)
            return await run.execute()
    finally:
        await close(nc)


class _Run:
    def __init__(
        self,
        client: Client,
        queue: WorkQueue,
        pipeline: Pipeline,
        settings: DemoSettings,
        services: list[str],
        stop: asyncio.Event,
        out: TextIO | None,
        progress_interval: float | None,
    ) -> None:
        self.client = client
        self.queue = queue
        self.pipeline = pipeline
        self.settings = settings
        self.stop = stop
        self.out = out
        self.tty = bool(out is not None and out.isatty())
        self.progress_interval = progress_interval or (1.0 if self.tty else 5.0)
        self.rng = random.Random(settings.seed)
        self.stats = DemoStats()
        self.router = Router(queue, pipeline, settings)
        self.supervisor = Supervisor(client, pipeline, self.router, self.stats)
        self.workers = [
            StageWorker(
                client,
                queue,
                self.router,
                pipeline,
                SERVICES[name],
                settings,
                self.stats,
                random.Random(self.rng.random()),
            )
            for name in services
        ]
        self.stopping = asyncio.Event()
        self.supervisor_task: asyncio.Task[None] | None = None

    def _check_supervisor(self) -> None:
        """Raise when the supervisor's watch ended: without it nothing counts or unsticks operations."""
        task = self.supervisor_task
        if task is not None and task.done():
            error = task.exception() if not task.cancelled() else None
            raise DemoError(f"the supervisor's bucket watch ended: {error!r}")

    async def execute(self) -> DemoReport:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        supervisor = self.supervisor_task = loop.create_task(self.supervisor.run())
        workers = [loop.create_task(worker.run(self.stopping)) for worker in self.workers]
        progress = loop.create_task(self._progress()) if self.out is not None else None
        try:
            await self._supervisor_ready(supervisor)
            await self._generate()
            await self._drain()
        finally:
            self.stopping.set()
            await asyncio.gather(*workers, return_exceptions=True)
            for task in (supervisor, progress):
                if task is not None:
                    task.cancel()
            await asyncio.gather(*(t for t in (supervisor, progress) if t is not None), return_exceptions=True)
        self._final_line()
        return DemoReport(
            stats=self.stats.as_dict(),
            elapsed=time.monotonic() - started,
            drained=self.stats.in_flight == 0,
            stopped=self.stop.is_set(),
        )

    async def _supervisor_ready(self, supervisor: asyncio.Task[None], timeout: float = 30.0) -> None:
        """Wait for the supervisor's first full view of the bucket (its watch replayed every key)."""
        ready = asyncio.ensure_future(self.supervisor.ready.wait())
        try:
            await asyncio.wait([ready, supervisor], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            await asyncio.gather(ready, return_exceptions=True)
        if supervisor.done():
            supervisor.result()  # the watch failed: raise its error
            raise DemoError("the supervisor stopped before the demo began")
        if not self.supervisor.ready.is_set():
            raise DemoError(f"the bucket watch did not replay the existing operations within {timeout:g}s")

    async def _generate(self) -> None:
        settings = self.settings
        if settings.rate <= 0:
            if settings.duration <= 0:
                await self.stop.wait()  # services only: run until stopped
            return
        loop = asyncio.get_running_loop()
        interval = 1.0 / settings.rate
        end = loop.time() + settings.duration if settings.duration > 0 else None
        next_at = loop.time()
        while not self.stop.is_set() and (end is None or loop.time() < end):
            self._check_supervisor()
            if self.stats.in_flight >= settings.max_in_flight:
                await asyncio.sleep(0.1)  # back-pressure: the pipeline is full
                next_at = loop.time()
                continue
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + interval, loop.time() - 1.0)  # never burst more than a second behind
            await self._create_one()

    async def _create_one(self) -> None:
        poison = None
        if self.rng.random() < self.settings.poison_rate:
            poison = self.rng.choice(list(Poison))
        number = self.stats.created + 1
        order = random_order(self.rng, number, poison)
        try:
            op = await self.client.create(self.pipeline.name, metadata={"input": order})
            self.supervisor.track(op)
            self.stats.created += 1
            await self.queue.publish(WorkItem(op=op.id, stage=self.pipeline.stage_names[0]))
        except (KvstateError, QueueError) as exc:
            # The supervisor re-queues the first stage of an operation whose publish was lost.
            self.stats.errors += 1
            log.warning("creating order %d: %s", number, exc)
            await asyncio.sleep(0.5)

    async def _drain(self) -> None:
        if self.stop.is_set():
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        while self.stats.in_flight > 0 and loop.time() < deadline and not self.stop.is_set():
            self._check_supervisor()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.2)

    async def _progress(self) -> None:
        while True:
            await asyncio.sleep(self.progress_interval)
            self._write(self.stats.line(), final=False)

    def _write(self, line: str, *, final: bool) -> None:
        if self.out is None:
            return
        if self.tty:
            self.out.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def _final_line(self) -> None:
        s = self.stats
        self._write(s.line(), final=True)
        self._write(
            f"demo done: created {s.created}, succeeded {s.succeeded}, failed {s.failed}, cancelled {s.cancelled}, "
            f"still live {s.in_flight}; updates applied {s.applied}, duplicate {s.duplicate}, stale {s.stale}; "
            f"retries {s.retries}, stuck attempts failed {s.stuck}, replayed messages {s.replays}; "
            f"transient kvstate errors retried {s.transient}, messages rejected {s.rejected}, errors {s.errors}",
            final=True,
        )
