"""cancel_and_wait: a task that loses a cancellation is cancelled again until it ends."""

from __future__ import annotations

import asyncio
import gc

from kvstate.tasks import cancel_and_wait


async def _swallows(times: int, seen: list[int]) -> None:
    """Loops on like a task whose cancel was lost in ``wait_for`` (Python 3.11)."""
    while True:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(1)
            if len(seen) > times:
                raise


async def test_a_task_that_loses_cancels_is_stopped() -> None:
    seen: list[int] = []
    task = asyncio.create_task(_swallows(2, seen))
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], patience=0.05) == set()
    assert task.cancelled() and len(seen) == 3


async def test_gives_up_after_its_rounds_and_says_which() -> None:
    seen: list[int] = []
    task = asyncio.create_task(_swallows(10, seen))
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], patience=0.01, rounds=3) == {task}
    assert len(seen) == 3
    assert await cancel_and_wait([task], patience=0.01) == set()


async def test_finished_and_failed_tasks_are_fine() -> None:
    async def fails() -> None:
        raise ValueError("boom")

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([done, failed]) == set()
    assert isinstance(failed.exception(), ValueError)


async def test_a_failed_task_is_retrieved_so_asyncio_reports_nothing() -> None:
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    async def fails() -> None:
        raise ValueError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    assert await cancel_and_wait([task]) == set()
    del task
    gc.collect()
    assert reported == []
