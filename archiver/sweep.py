"""The sweep: removes finished operations the archive already holds at their revision.

It catches removals lost to a crash (they were only scheduled in memory) or to a NATS
outage. It reads only the keys and revisions of the bucket (``ChangeFeed.live_revisions``,
no values): an operation whose current revision is the one archived is finished, and
the archive row says when it finished. The same rule as removals after a commit: only an
(id, revision) archived from this incarnation of the bucket at exactly that revision,
past its grace period, leaves the bucket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from archiver.errors import ArchiveUnavailable
from archiver.removals import Removals
from archiver.store import ArchiveStore
from kvstate.errors import KvstateError
from kvstate.feed import ChangeFeed

__all__ = ["sweep", "sweep_periodically"]

log = logging.getLogger("archiver")

_LOOKUP = 1000
"""ids asked of the archive per query"""


async def sweep(feed: ChangeFeed, store: ArchiveStore, removals: Removals, *, source: int, grace_period: float) -> int:
    """Remove every live operation archived from ``source`` at its current revision and finished
    more than ``grace_period`` seconds ago; returns how many were removed."""
    cutoff = time.time() - grace_period
    current = await feed.live_revisions()
    if not current:
        return 0
    ids = list(current)
    archived: dict[str, tuple[int, float]] = {}
    for start in range(0, len(ids), _LOOKUP):
        archived.update(await store.archived_snapshots(ids[start : start + _LOOKUP], source))
    eligible = [
        (op_id, revision)
        for op_id, revision in current.items()
        if op_id in archived and archived[op_id][0] == revision and archived[op_id][1] <= cutoff
    ]
    removed = await removals.remove(eligible)
    if removed:
        log.info("sweep removed=%d live=%d", removed, len(current))
    return removed


async def sweep_periodically(
    sweep_once: Callable[[], Awaitable[int]], every: float, active: Callable[[], bool]
) -> None:
    """``sweep_once()`` every ``every`` seconds while ``active()``; a failed sweep is logged and retried next time."""
    while active():
        try:
            await sweep_once()
        except (ArchiveUnavailable, KvstateError) as exc:
            log.warning("sweep failed (retried next interval): %s", exc)
        await asyncio.sleep(every)
