"""Stopping background tasks for sure.

On Python 3.11 a cancellation can be lost: ``asyncio.wait_for`` returns the result when the
awaited future completes in the same loop step as the cancel (nats-py waits for every request
that way), and a task that loops then runs on. ``cancel_and_wait`` cancels again until the
tasks have ended, so a shutdown never hangs on such a race.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["cancel_and_wait"]

log = logging.getLogger(__name__)


async def cancel_and_wait(
    tasks: Iterable[asyncio.Future[Any]], *, patience: float = 0.5, rounds: int = 20
) -> set[asyncio.Future[Any]]:
    """Cancel ``tasks`` and wait until they have ended, cancelling again every ``patience`` seconds.

    Returns the tasks still running after ``rounds`` cancels (logged; normally none). Their
    results and exceptions are consumed: a stopped task's error is not raised here.
    """
    every = set(tasks)
    pending = {task for task in every if not task.done()}
    for _ in range(rounds):
        if not pending:
            break
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    for task in every - pending:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio logs no "exception was never retrieved"
    for task in pending:
        log.warning("task %r did not stop after %d cancels", task, rounds)
    return pending
