"""Errors of the development stack.

StackError       ``kvstate up`` could not start or keep a component running
"""

from __future__ import annotations

__all__ = ["StackError"]


class StackError(Exception):
    """A component of the local stack failed to start or stopped unexpectedly."""
