"""The checker: recorded calls against what the bucket stored, once the cluster is healed.

Pure functions over recorded data (``Call``, ``Seen``) and the stored chains (``Stored``),
as etcd's robustness tests check a history against its model. Each key's revisions form a
chain (the bucket keeps up to 64 revisions per key during the suite, and the workloads
write fewer than that per key, so the chain is whole):

- a raw compare-and-set key stores one write token per revision and the revision it
  expected (``prev``): the chain must link each revision to its predecessor (0 first);
- a kvstate operation key stores the event ids applied so far (``Operation.events``): each
  revision must keep every event id of its predecessor (up to the event window) and add
  its own; an event id that appears twice was applied twice.

``check`` reports: acknowledged writes missing (``lost``), stored writes nobody attempted
(``phantom``), forks (a revision not linked to its predecessor, two acknowledgements of one
revision, an acknowledged revision holding another token), duplicates (a token or event
applied twice), refused writes that were stored anyway, and how every ambiguous call
resolved. ``check_watch`` checks what a watcher delivered against the stored truth.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from robustness.history import Call, Seen

__all__ = ["CheckReport", "Stored", "WatchReport", "check", "check_watch"]


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored revision of a key, as the checker needs it."""

    revision: int
    tokens: tuple[str, ...]
    """raw CAS key: this revision's own write token; operation key: every event id it holds"""
    prev: int | None = None
    """raw CAS key: the revision the write expected; None for operation keys"""


@dataclass
class CheckReport:
    """What ``check`` found; ``problems`` lists one line per violation (capped)."""

    acked: int = 0
    lost: int = 0
    phantom: int = 0
    forks: int = 0
    duplicates: int = 0
    refused_but_stored: int = 0
    ambiguous: int = 0
    ambiguous_applied: int = 0
    ambiguous_absent: int = 0
    stored_revisions: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(problem)

    @property
    def ok(self) -> bool:
        """True when nothing was lost, invented, forked or applied twice."""
        return not (self.lost or self.phantom or self.forks or self.duplicates or self.refused_but_stored)

    def figures(self) -> dict[str, int]:
        """The counts, for a ScenarioResult."""
        return {
            "acked": self.acked,
            "lost": self.lost,
            "phantom": self.phantom,
            "forks": self.forks,
            "duplicates": self.duplicates,
            "refused_but_stored": self.refused_but_stored,
            "ambiguous": self.ambiguous,
            "ambiguous_applied": self.ambiguous_applied,
            "ambiguous_absent": self.ambiguous_absent,
            "stored_revisions": self.stored_revisions,
        }


def _first_appearance(key: str, chain: Sequence[Stored], window: int, report: CheckReport) -> dict[str, int]:
    """Token -> the revision that introduced it; notes forks and duplicates along the chain."""
    introduced: dict[str, int] = {}
    previous: Stored | None = None
    for stored in chain:
        if previous is not None and stored.revision <= previous.revision:
            report.forks += 1
            report.note(f"{key}: revision {stored.revision} stored after {previous.revision}")
        repeated = [token for token, n in Counter(stored.tokens).items() if n > 1]
        for token in repeated:
            report.duplicates += 1
            report.note(f"{key}@{stored.revision}: {token} applied more than once")
        if stored.prev is not None:  # a raw CAS chain
            expected = previous.revision if previous is not None else 0
            if stored.prev != expected:
                report.forks += 1
                report.note(f"{key}@{stored.revision}: written against {stored.prev}, its predecessor is {expected}")
            new = stored.tokens
        else:  # an operation: it must carry its predecessor's event ids forward
            before = previous.tokens if previous is not None else ()
            now = set(stored.tokens)
            new = tuple(token for token in stored.tokens if token not in set(before))
            may_drop = max(0, len(before) + len(new) - window)
            dropped = [token for token in before[may_drop:] if token not in now]
            if dropped:
                report.forks += 1
                report.note(f"{key}@{stored.revision}: lost {dropped[:3]} of its predecessor (a lost update)")
        for token in new:
            if token in introduced:
                report.duplicates += 1
                report.note(f"{key}: {token} applied at {introduced[token]} and again at {stored.revision}")
            else:
                introduced[token] = stored.revision
        previous = stored
    return introduced


def check(calls: Iterable[Call], chains: Mapping[str, Sequence[Stored]], *, window: int = 32) -> CheckReport:
    """Check recorded ``calls`` against the stored ``chains`` (key -> revisions, oldest first).

    Calls without a token (reads) are ignored. ``window`` is how many event ids an
    operation keeps (kvstate's EVENT_WINDOW): older ones may drop out of the chain.
    """
    report = CheckReport()
    introduced: dict[str, dict[str, int]] = {}
    cas_keys: set[str] = set()
    for key, chain in chains.items():
        report.stored_revisions += len(chain)
        introduced[key] = _first_appearance(key, chain, window, report)
        if any(stored.prev is not None for stored in chain):
            cas_keys.add(key)

    attempted: dict[str, set[str]] = defaultdict(set)
    acked_revisions: dict[tuple[str, int], str] = {}
    for call in calls:
        if call.token is None:
            continue
        attempted[call.key].add(call.token)
        where = introduced.get(call.key, {}).get(call.token)
        _check_call(call, where, call.key in cas_keys, acked_revisions, report)

    for key, tokens in introduced.items():
        for token, revision in tokens.items():
            if token not in attempted.get(key, ()):
                report.phantom += 1
                report.note(f"{key}@{revision}: {token} stored but never attempted")
    return report


def _check_call(
    call: Call, where: int | None, cas: bool, acked_revisions: dict[tuple[str, int], str], report: CheckReport
) -> None:
    """One call against the revision that introduced its token (``where``, None: not stored)."""
    token = call.token
    if call.outcome == "ok":
        report.acked += 1
        if call.op == "cas" and call.revision is not None and token is not None:
            other = acked_revisions.setdefault((call.key, call.revision), token)
            if other != token:
                report.forks += 1
                report.note(f"{call.key}@{call.revision} acknowledged to both {other} and {token}")
        if where is None:
            report.lost += 1
            report.note(f"{call.key}: {call.op} {token} acknowledged at {call.revision}, not stored")
        elif cas and call.revision is not None and where != call.revision:
            report.forks += 1
            report.note(f"{call.key}: {token} acknowledged at {call.revision}, stored at {where}")
    elif call.outcome == "conflict" and cas:
        if where is not None:  # a single refused compare-and-set must not be stored
            report.refused_but_stored += 1
            report.note(f"{call.key}: {token} refused as a conflict, stored at {where}")
    else:  # unknown, error, and a kvstate update's conflict (its earlier attempts may have landed)
        report.ambiguous += 1
        if where is None:
            report.ambiguous_absent += 1
        else:
            report.ambiguous_applied += 1


@dataclass
class WatchReport:
    """What a watcher delivered against the stored truth."""

    delivered: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    gaps: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Ordered, no duplicate, no gap."""
        return not (self.out_of_order or self.duplicates or self.gaps)

    def figures(self, prefix: str) -> dict[str, int]:
        """The counts, named ``prefix_...``."""
        return {
            f"{prefix}_delivered": self.delivered,
            f"{prefix}_out_of_order": self.out_of_order,
            f"{prefix}_duplicates": self.duplicates,
            f"{prefix}_gaps": self.gaps,
        }


def check_watch(seen: Sequence[Seen], truth: Iterable[tuple[str, int]], *, after: int, until: int) -> WatchReport:
    """Check one watcher's deliveries, in delivery order, against ``truth`` ((key, revision) pairs).

    The watcher must deliver every stored revision in ``(after, until]`` of the keys it
    watches, each once, in increasing revision (stream sequence) order.
    """
    report = WatchReport(delivered=len(seen))
    last = after
    delivered: set[int] = set()
    for item in seen:
        if item.revision in delivered:
            report.duplicates += 1
            if len(report.problems) < 50:
                report.problems.append(f"{item.watcher}: {item.key}@{item.revision} delivered twice")
        elif item.revision <= last:
            report.out_of_order += 1
            if len(report.problems) < 50:
                report.problems.append(f"{item.watcher}: {item.key}@{item.revision} after {last}")
        delivered.add(item.revision)
        last = max(last, item.revision)
    for key, revision in truth:
        if after < revision <= until and revision not in delivered:
            report.gaps += 1
            if len(report.problems) < 50:
                report.problems.append(f"missed {key}@{revision}")
    return report
