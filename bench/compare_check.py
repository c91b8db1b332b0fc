"""The checker: every operation's writes and final state against what the workers really did.

- **lost update**: a stage's successful attempt wrote metadata (acknowledged) and the
  final state does not hold exactly that metadata;
- **stale write**: an acknowledged write that moved a stage backwards (to an older attempt,
  or from finished back to running or retrying) or the operation from a terminal status
  back to a live one, compared with the write committed just before it;
- **wrong final**: an operation whose final stage statuses, attempts or status differ from
  the last real event of each stage (or that is missing altogether).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.workload import MessageKind, OperationPlan, RunRecord, StageView, View

__all__ = ["TERMINAL_STATUSES", "CheckResult", "check_run"]

_PHASE = {"waiting": 0, "running": 1, "retrying": 2, "failed": 2, "succeeded": 2, "skipped": 2, "cancelled": 2}
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
"""Operation statuses that mean finished (the archiver archives such operations)."""


@dataclass(slots=True)
class CheckResult:
    """What the checker found in one run."""

    operations: int = 0
    results_checked: int = 0
    lost_updates: int = 0
    stale_writes: int = 0
    wrong_final: int = 0
    missing: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing was lost, moved backwards or ended wrong."""
        return not (self.lost_updates or self.stale_writes or self.wrong_final or self.missing)

    def note(self, text: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(text)


def _rank(stage: StageView) -> tuple[int, int]:
    return (stage.attempt, _PHASE.get(stage.status, 0))


def _went_backwards(before: View, after: View) -> str | None:
    if before.status in TERMINAL_STATUSES and after.status not in TERMINAL_STATUSES:
        return f"operation {before.status} -> {after.status}"
    for name, old in before.stages.items():
        new = after.stages.get(name)
        if new is None or _rank(new) < _rank(old):
            where = f"{new.status} attempt {new.attempt}" if new else "gone"
            return f"stage {name} {old.status} attempt {old.attempt} -> {where}"
    return None


def check_run(plans: Sequence[OperationPlan], record: RunRecord, finals: Mapping[str, View]) -> CheckResult:
    """Compare ``record``'s acknowledged writes and the ``finals`` with the ``plans``."""
    result = CheckResult(operations=len(plans))
    writes: dict[str, dict[int, View]] = defaultdict(dict)
    acknowledged: set[str] = set()
    for delivery in record.deliveries:
        if delivery.error is None:
            acknowledged.add(delivery.message.event_id)
        if delivery.view is not None:
            writes[delivery.key][delivery.view.order] = delivery.view

    for plan in plans:
        chain = [view for _, view in sorted(writes.get(plan.key, {}).items())]
        for before, after in itertools.pairwise(chain):
            backwards = _went_backwards(before, after)
            if backwards is not None:
                result.stale_writes += 1
                result.note(f"{plan.key}: write {after.order} moved {backwards}")

        final = finals.get(plan.key)
        if final is None:
            result.missing += 1
            result.note(f"{plan.key}: missing at the end")
            continue
        wrong = []
        if final.status != "succeeded":
            wrong.append(f"status {final.status}")
        for name, expected in plan.expected.items():
            got = final.stages.get(name)
            if got is None or (got.status, got.attempt) != (expected.status, expected.attempt):
                seen = f"{got.status} attempt {got.attempt}" if got else "absent"
                wrong.append(f"{name} {seen}, expected {expected.status} attempt {expected.attempt}")
            if expected.metadata is None:
                continue
            succeed_ids = {
                m.event_id for m in plan.stages[name].messages if m.kind is MessageKind.SUCCEED
            } & acknowledged
            result.results_checked += bool(succeed_ids)
            if succeed_ids and (got is None or got.metadata != expected.metadata):
                result.lost_updates += 1
                result.note(f"{plan.key}: metadata of {name} lost (final {got.metadata if got else None})")
        if wrong:
            result.wrong_final += 1
            result.note(f"{plan.key}: final state wrong: {'; '.join(wrong)}")
    return result
