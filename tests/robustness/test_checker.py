"""The checker on small hand-made histories: each kind of violation is reported, a clean history is not."""

from __future__ import annotations

from robustness.checker import Stored, check, check_watch
from robustness.history import Call, Outcome, Seen


def cas(token: str, outcome: Outcome, *, key: str = "cas.1", expected: int = 0, revision: int | None = None) -> Call:
    return Call(
        client="w1",
        key=key,
        op="cas",
        invoke=0.0,
        ret=0.1,
        outcome=outcome,
        expected=expected,
        revision=revision,
        token=token,
    )


def event(token: str, outcome: Outcome, *, key: str = "op.A", revision: int | None = None) -> Call:
    return Call(client="w1", key=key, op="start", invoke=0.0, ret=0.1, outcome=outcome, revision=revision, token=token)


CLEAN_CHAIN = [Stored(1, ("a",), prev=0), Stored(5, ("b",), prev=1), Stored(9, ("c",), prev=5)]
CLEAN_CALLS = [
    cas("a", "ok", revision=1),
    cas("x", "conflict", expected=0),
    cas("b", "ok", expected=1, revision=5),
    cas("c", "unknown", expected=5),
    cas("d", "unknown", expected=9),
]


def test_a_clean_history_passes_and_resolves_each_ambiguous_call() -> None:
    report = check(CLEAN_CALLS, {"cas.1": CLEAN_CHAIN})
    assert report.ok, report.problems
    assert (report.acked, report.ambiguous, report.ambiguous_applied, report.ambiguous_absent) == (2, 2, 1, 1)


def test_an_acknowledged_write_missing_from_the_chain_is_lost() -> None:
    report = check([*CLEAN_CALLS, cas("e", "ok", expected=9, revision=12)], {"cas.1": CLEAN_CHAIN})
    assert report.lost == 1 and not report.ok


def test_a_revision_written_against_an_older_predecessor_is_a_fork() -> None:
    forked = [Stored(1, ("a",), prev=0), Stored(5, ("b",), prev=1), Stored(9, ("c",), prev=1)]
    report = check(CLEAN_CALLS, {"cas.1": forked})
    assert report.forks == 1 and not report.ok


def test_one_revision_acknowledged_to_two_writers_is_a_fork() -> None:
    calls = [*CLEAN_CALLS, cas("b2", "ok", expected=1, revision=5)]
    report = check(calls, {"cas.1": CLEAN_CHAIN})
    assert report.forks >= 1 and report.lost == 1


def test_a_token_stored_twice_is_a_duplicate() -> None:
    twice = [*CLEAN_CHAIN, Stored(11, ("c",), prev=9)]
    report = check(CLEAN_CALLS, {"cas.1": twice})
    assert report.duplicates == 1 and not report.ok


def test_a_stored_value_nobody_wrote_is_a_phantom() -> None:
    report = check(CLEAN_CALLS, {"cas.1": [*CLEAN_CHAIN, Stored(11, ("zz",), prev=9)]})
    assert report.phantom == 1 and not report.ok


def test_a_refused_compare_and_set_that_was_stored_is_reported() -> None:
    report = check([*CLEAN_CALLS, cas("c", "conflict", expected=5)], {"cas.1": CLEAN_CHAIN})
    assert report.refused_but_stored == 1 and not report.ok


def test_an_operation_revision_dropping_an_earlier_event_is_a_lost_update() -> None:
    calls = [event("e1", "ok", revision=1), event("e2", "ok", revision=2), event("e3", "ok", revision=3)]
    chain = [Stored(1, ("e1",)), Stored(2, ("e1", "e2")), Stored(3, ("e1", "e3"))]
    report = check(calls, {"op.A": chain})
    assert report.forks == 1 and not report.ok
    assert check(calls, {"op.A": [*chain[:2], Stored(3, ("e1", "e2", "e3"))]}).ok


def test_an_event_applied_twice_to_an_operation_is_a_duplicate() -> None:
    calls = [event("e1", "ok", revision=1), event("e2", "unknown"), event("e2", "ok", revision=3)]
    chain = [Stored(1, ("e1",)), Stored(2, ("e1", "e2")), Stored(3, ("e1", "e2", "e2"))]
    report = check(calls, {"op.A": chain})
    assert report.duplicates >= 1 and not report.ok


def test_events_older_than_the_window_may_drop_out() -> None:
    calls = [event(f"e{i}", "ok") for i in range(4)]
    chain = [Stored(1, ("e0", "e1")), Stored(2, ("e1", "e2")), Stored(3, ("e2", "e3"))]
    assert check(calls, {"op.A": chain}, window=2).ok
    assert not check(calls, {"op.A": chain}, window=3).ok


def seen(*revisions: int) -> list[Seen]:
    return [Seen(watcher="w", key="op.A", revision=r, at=float(i)) for i, r in enumerate(revisions)]


TRUTH = [("op.A", r) for r in (3, 4, 6, 8)]


def test_a_watcher_that_saw_everything_once_in_order_passes() -> None:
    assert check_watch(seen(3, 4, 6, 8), TRUTH, after=2, until=8).ok


def test_a_watcher_gap_duplicate_and_reordering_are_each_reported() -> None:
    gap = check_watch(seen(3, 6, 8), TRUTH, after=2, until=8)
    assert gap.gaps == 1 and not gap.ok
    dup = check_watch(seen(3, 4, 4, 6, 8), TRUTH, after=2, until=8)
    assert dup.duplicates == 1 and not dup.ok
    reordered = check_watch(seen(3, 6, 4, 8), TRUTH, after=2, until=8)
    assert reordered.out_of_order == 1 and not reordered.ok
