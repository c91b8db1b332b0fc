"""Errors of the demo, in one tree.

DemoError            base of everything below
└── QueueError       the JetStream work queue could not be used (stream, consumer, publish)
"""

from __future__ import annotations

__all__ = ["DemoError", "QueueError"]


class DemoError(Exception):
    """Base class of the demo's errors."""


class QueueError(DemoError):
    """The work queue could not be opened, read or written; the NATS error is the cause."""
