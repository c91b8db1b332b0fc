"""Errors of the demo and the local stack, in one tree.

DemoError            base of everything below
├── QueueError       the JetStream work queue could not be used (stream, consumer, publish)
└── StackError       ``kvstate up`` could not start or keep a component running
"""

from __future__ import annotations

__all__ = ["DemoError", "QueueError", "StackError"]


class DemoError(Exception):
    """Base class of the demo's errors."""


class QueueError(DemoError):
    """The work queue could not be opened, read or written; the NATS error is the cause."""


class StackError(DemoError):
    """A component of the local stack failed to start or stopped unexpectedly."""
