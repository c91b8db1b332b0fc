"""How an archiver process runs: on uvloop when installed, with its start-up heap frozen.

The archiver's work is many small messages and rows, so the event loop's own overhead
and the garbage collector's scans count. The ``archiver`` extra installs uvloop
(``run``); ``freeze_heap`` moves everything allocated during start-up (modules,
connections, pools) out of the collector's reach, so that its scans only visit what
the archiver allocates per batch. ``bench/archiver.py`` runs the archiver the same way.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["freeze_heap", "run"]

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop's event loop when uvloop is installed."""
    try:
        import uvloop  # optional: the archiver extra installs it
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def freeze_heap() -> None:
    """Collect once, then keep every object alive now out of later collections (``gc.freeze``)."""
    gc.collect()
    gc.freeze()
