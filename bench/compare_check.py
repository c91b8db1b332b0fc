"""The checker: every operation's writes and final state against what the workers really did.

- **lost update**: an acknowledged metadata write that left no trace in the final state: a
  stage's result (the members its successful attempt wrote with ``succeed``) missing or
  changed, or a stage or the shared metadata holding none of its patches although the
  newest one was acknowledged (each such write counts once);
- **stale write**: an acknowledged write that moved a stage backwards (to an older attempt,
  or from finished back to running or retrying) or the operation from a terminal status
  back to a live one, compared with the write committed just before it;
- **stale metadata**: final metadata that holds an older patch than the newest applicable
  one: a stage's namespace holding the patch of a superseded attempt instead of its final
  attempt's, or the shared metadata holding a patch that a newer acknowledged one replaced
  (one count per stage, one per operation's shared metadata). The newest applicable patch
  is the last acknowledged one in the order the plan meant them to apply (attempts in
  order; each shared patch after the one it expects).
- **wrong final**: an operation whose final stage statuses, attempts or status differ from
  the last real event of each stage (or that is missing altogether).

A patch counts as held when every member it sets has that value in the final metadata.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from bench.workload import Expected, Message, MessageKind, OperationPlan, RunRecord, StageView, View

__all__ = ["TERMINAL_STATUSES", "CheckResult", "check_run"]

_PHASE = {"waiting": 0, "running": 1, "retrying": 2, "failed": 2, "succeeded": 2, "skipped": 2, "cancelled": 2}
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
"""Operation statuses that mean finished (the archiver archives such operations)."""


@dataclass(slots=True)
class CheckResult:
    """What the checker found in one run."""

    operations: int = 0
    results_checked: int = 0
    metadata_checked: int = 0
    """stage namespaces and shared metadata whose newest patch was acknowledged"""
    lost_updates: int = 0
    stale_writes: int = 0
    stale_metadata: int = 0
    wrong_final: int = 0
    missing: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when nothing was lost, moved backwards, left stale or ended wrong."""
        return not (self.lost_updates or self.stale_writes or self.stale_metadata or self.wrong_final or self.missing)

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


def _holds(metadata: Mapping[str, object] | None, patch: Mapping[str, object] | None) -> bool:
    """Every member ``patch`` sets has that value in ``metadata``."""
    found = metadata or {}
    return all(name in found and found[name] == value for name, value in (patch or {}).items())


def _patch_found(
    result: CheckResult, where: str, metadata: Mapping[str, object] | None, patches: Sequence[Message], newest: Message
) -> None:
    """Count the final ``metadata`` against the ``newest`` applicable patch of ``patches`` (oldest first)."""
    result.metadata_checked += 1
    at = patches.index(newest)
    # a later patch whose write landed although its call failed is not older: nothing went stale
    if any(_holds(metadata, p.metadata) for p in patches[at:]):
        return
    older = [p for p in patches[:at] if _holds(metadata, p.metadata)]
    if older:
        result.stale_metadata += 1
        result.note(f"{where} holds the patch of {older[-1].event_id}, not of {newest.event_id}")
    else:
        result.lost_updates += 1
        result.note(f"{where} lost the patch {newest.event_id} (final {dict(metadata or {})})")


def _check_stage(
    result: CheckResult,
    plan: OperationPlan,
    name: str,
    expected: Expected,
    got: StageView | None,
    acknowledged: set[str],
) -> str | None:
    """Count the final stage's lost result and stale or lost patch; what is wrong with its status, if anything."""
    patches = plan.stage_patches(name)
    newest = [p for p in patches if p.event_id in acknowledged]
    if newest:
        _patch_found(result, f"{plan.key}: {name}", got.metadata if got else None, patches, newest[-1])
    if expected.metadata is not None:
        succeed_ids = {m.event_id for m in plan.stages[name].messages if m.kind is MessageKind.SUCCEED} & acknowledged
        result.results_checked += bool(succeed_ids)
        if succeed_ids and (got is None or not _holds(got.metadata, expected.metadata)):
            result.lost_updates += 1
            result.note(f"{plan.key}: metadata of {name} lost (final {got.metadata if got else None})")
    if got is None or (got.status, got.attempt) != (expected.status, expected.attempt):
        seen = f"{got.status} attempt {got.attempt}" if got else "absent"
        return f"{name} {seen}, expected {expected.status} attempt {expected.attempt}"
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
            wrong_stage = _check_stage(result, plan, name, expected, final.stages.get(name), acknowledged)
            if wrong_stage is not None:
                wrong.append(wrong_stage)
        shared = plan.shared_patches
        newest = [p for p in shared if p.event_id in acknowledged]
        if newest:
            _patch_found(result, f"{plan.key}: shared metadata", final.metadata, shared, newest[-1])
        if wrong:
            result.wrong_final += 1
            result.note(f"{plan.key}: final state wrong: {'; '.join(wrong)}")
    return result
