"""Operation keys in age order, kept in blocks: cheap inserts and removals anywhere.

The summary store (``dashboard.store``) keeps one such order over every live operation and one per status,
pipeline, worker and (stage, stage status); a filtered list walks the narrowest of them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from itertools import chain

__all__ = ["BLOCK", "Key", "SortedKeys"]

Key = tuple[float, str]
"""An operation's place in the age order: (created, id). Also the page cursor."""
BLOCK = 512
"""Keys per block of a SortedKeys (blocks split at twice this)."""


class SortedKeys:
    """Operation keys in (created, id) order, kept in blocks of up to ``2 * BLOCK``.

    An insert or removal moves the pointers of one block, not of every key after it:
    with one flat list of 100,000 keys, removing the oldest operation (what the archiver
    does all day) would move all of them, once per list the operation is in.
    """

    __slots__ = ("_blocks", "_len", "_maxes")

    def __init__(self, ordered: list[Key] | None = None) -> None:
        """Keys from ``ordered``, which must be sorted already."""
        ordered = ordered or []
        self._blocks = [ordered[i : i + BLOCK] for i in range(0, len(ordered), BLOCK)]
        self._maxes = [block[-1] for block in self._blocks]  # the last key of each block
        self._len = len(ordered)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Key]:
        return chain.from_iterable(self._blocks)

    def add(self, key: Key) -> None:
        """Insert ``key`` (not already present)."""
        self._len += 1
        blocks, maxes = self._blocks, self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):  # past every key: the common case, a new operation is the newest
            if not blocks:
                blocks.append([key])
                maxes.append(key)
                return
            i -= 1
            blocks[i].append(key)
            maxes[i] = key
        else:
            insort(blocks[i], key)
        block = blocks[i]
        if len(block) > 2 * BLOCK:
            blocks[i : i + 1] = [block[:BLOCK], block[BLOCK:]]
            maxes[i : i + 1] = [block[BLOCK - 1], block[-1]]

    def discard(self, key: Key) -> None:
        """Remove ``key`` if present."""
        blocks, maxes = self._blocks, self._maxes
        i = bisect_left(maxes, key)
        if i == len(maxes):
            return
        block = blocks[i]
        pos = bisect_left(block, key)
        if block[pos] != key:
            return
        del block[pos]
        self._len -= 1
        if not block:
            del blocks[i], maxes[i]
        elif pos == len(block):
            maxes[i] = block[-1]

    def _locate(self, key: Key | None, default: int) -> tuple[int, int]:
        """(block, position) of the first key >= ``key``; of the start (0) or end (1) when None."""
        if key is None:
            return (0, 0) if default == 0 else (len(self._blocks), 0)
        i = bisect_left(self._maxes, key)
        return (i, 0) if i == len(self._maxes) else (i, bisect_left(self._blocks[i], key))

    def _pieces(self, low: Key | None, high: Key | None) -> list[list[Key]]:
        """The keys k with low <= k < high (None: unbounded) as runs in order; whole blocks are not copied."""
        (i, p), (j, q) = self._locate(low, 0), self._locate(high, 1)
        if (i, p) >= (j, q):
            return []
        blocks = self._blocks
        if i == j:
            return [blocks[i][p:q]]
        pieces = [blocks[i][p:] if p else blocks[i], *blocks[i + 1 : j]]
        if q:
            pieces.append(blocks[j][:q])
        return pieces

    def count(self, low: Key | None, high: Key | None) -> int:
        """How many keys k satisfy low <= k < high."""
        if low is None and high is None:
            return self._len
        return sum(map(len, self._pieces(low, high)))

    def walk(self, low: Key | None, high: Key | None, descending: bool) -> Iterator[Key]:
        """The keys k with low <= k < high, ascending or descending."""
        pieces = self._pieces(low, high)
        if descending:
            return chain.from_iterable(map(reversed, reversed(pieces)))
        return chain.from_iterable(pieces)
