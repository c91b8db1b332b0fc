"""JSON merge patch (RFC 7386) on plain JSON values, without mutating the inputs."""

from __future__ import annotations

__all__ = ["merge_patch"]


def merge_patch(target: object, patch: object) -> object:
    """Apply ``patch`` to ``target`` as RFC 7386 describes and return the result.

    A patch that is not an object replaces the target. In an object patch, ``null``
    removes a member and an object member is merged recursively. Neither argument is
    modified; unchanged sub-objects of ``target`` are shared with the result.
    """
    if not isinstance(patch, dict):
        return patch
    result: dict[str, object] = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
