"""The in-memory index: incremental counts, queries, stuck detection, corrupt values (pure, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.index import CORRUPT, STAGE_STATUSES, OperationFilter, OperationIndex
from kvstate import Change, CorruptValue, Operation, Pipeline, StageSpec, StageStatus
from kvstate.events import Cancel, FailStage, Heartbeat, StartStage, SucceedStage
from kvstate.machine import apply_event, new_operation

PIPELINE = Pipeline(
    name="orders",
    heartbeat_timeout=30.0,
    stages=(
        StageSpec(name="ingest", deadline=10.0),
        StageSpec(name="geo", after=("ingest",)),
        StageSpec(name="fraud", after=("ingest",)),
    ),
)
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class Ops:
    """Builds operations through the real state machine and feeds them to an index with revisions."""

    def __init__(self, index: OperationIndex) -> None:
        self.index = index
        self.revision = 0
        self.current: dict[str, Operation] = {}

    def put(self, op: Operation, now: datetime) -> Operation:
        self.revision += 1
        import msgspec

        op = msgspec.structs.replace(op, revision=self.revision)
        self.current[op.id] = op
        self.index.apply(Change(op.id, self.revision, op), now.timestamp())
        return op

    def create(self, op_id: str, at: datetime, metadata: dict[str, object] | None = None) -> Operation:
        return self.put(new_operation(op_id, PIPELINE, at, metadata or {}), at)

    def event(self, op_id: str, event: object, at: datetime) -> Operation:
        decision = apply_event(self.current[op_id], PIPELINE, event, at)  # type: ignore[arg-type]
        return self.put(decision.operation, at)

    def remove(self, op_id: str) -> None:
        self.revision += 1
        self.current.pop(op_id)
        self.index.apply(Change(op_id, self.revision, None, deleted=True), T0.timestamp())


def brute_stage_counts(ops: dict[str, Operation]) -> dict[str, dict[StageStatus, int]]:
    counts: dict[str, dict[StageStatus, int]] = {s.name: dict.fromkeys(STAGE_STATUSES, 0) for s in PIPELINE.stages}
    for op in ops.values():
        for name, state in op.stages.items():
            if state.status is StageStatus.WAITING and op.done:
                continue
            counts[name][state.status] += 1
    return counts


@pytest.fixture
def ops() -> Ops:
    index = OperationIndex(stats_window=900)
    index.set_pipeline(PIPELINE)
    return Ops(index)


def test_counts_follow_every_transition(ops: Ops) -> None:
    ops.create("a", T0)
    ops.create("b", T0)
    ops.event("a", StartStage(stage="ingest", worker="w1"), T0 + timedelta(seconds=1))
    stats = ops.index.stage_stats(PIPELINE, T0.timestamp() + 2)
    assert stats["ingest"].counts[StageStatus.RUNNING] == 1
    assert stats["ingest"].counts[StageStatus.WAITING] == 1
    ops.event("a", SucceedStage(stage="ingest"), T0 + timedelta(seconds=3))
    stats = ops.index.stage_stats(PIPELINE, T0.timestamp() + 4)
    assert stats["ingest"].counts[StageStatus.RUNNING] == 0
    assert stats["ingest"].counts[StageStatus.SUCCEEDED] == 1
    assert stats["ingest"].p50 == pytest.approx(2.0)
    assert ops.index.status_counts() == {"running": 1, "pending": 1}


def test_finished_operation_leaves_waiting_counts_and_counts_throughput(ops: Ops) -> None:
    ops.create("a", T0)
    ops.event("a", Cancel(reason="x"), T0 + timedelta(seconds=5))
    stats = ops.index.stage_stats(PIPELINE, T0.timestamp() + 6)
    assert stats["geo"].counts[StageStatus.WAITING] == 0
    assert ops.index.status_counts() == {"cancelled": 1}
    minute = ops.index.throughput(T0.timestamp() + 6, minutes=1)
    assert minute[-1][1:] == (1, 1)  # one started, one finished this minute


def test_removal_and_corrupt_values(ops: Ops) -> None:
    ops.create("a", T0)
    ops.remove("a")
    assert len(ops.index) == 0
    assert ops.index.status_counts() == {}
    error = CorruptValue("op.bad", 7, "not json", b"{oops")
    ops.index.apply(Change("bad", 7, None, error=error), T0.timestamp())
    assert ops.index.status_counts() == {CORRUPT: 1}
    page, _ = ops.index.query(OperationFilter(statuses=frozenset({CORRUPT})), 10)
    assert [op.id for op in page] == ["bad"]


def test_stale_replay_of_an_older_revision_is_ignored(ops: Ops) -> None:
    op = ops.create("a", T0)
    newer = ops.event("a", StartStage(stage="ingest"), T0 + timedelta(seconds=1))
    ops.index.apply(Change("a", op.revision, op), T0.timestamp())
    summary = ops.index.get("a")
    assert summary is not None and summary.revision == newer.revision


def test_stuck_by_deadline_and_by_heartbeat_and_cleared_by_progress(ops: Ops) -> None:
    ops.create("a", T0)
    ops.create("b", T0)
    ops.event("a", StartStage(stage="ingest"), T0)
    ops.event("b", StartStage(stage="ingest"), T0)
    ops.event("b", SucceedStage(stage="ingest"), T0 + timedelta(seconds=1))
    ops.event("b", StartStage(stage="geo"), T0 + timedelta(seconds=1))
    assert not ops.index.tick(T0.timestamp() + 9)
    assert ops.index.tick(T0.timestamp() + 11)  # ingest of a: past its 10 s deadline
    stuck, total = ops.index.stuck()
    assert total == 1 and stuck[0].op_id == "a" and "deadline" in stuck[0].reason
    ops.event("b", Heartbeat(stage="geo"), T0 + timedelta(seconds=20))
    assert not ops.index.tick(T0.timestamp() + 40)  # b beat at 20 s: due at 50 s
    assert ops.index.tick(T0.timestamp() + 51)
    assert {s.op_id for s in ops.index.stuck()[0]} == {"a", "b"}
    assert "heartbeat" in ops.index.stuck_stages_of("b")["geo"].reason
    ops.event("a", SucceedStage(stage="ingest"), T0 + timedelta(seconds=52))
    assert {s.op_id for s in ops.index.stuck()[0]} == {"b"}


def test_stuck_filter_lists_operations_with_a_stuck_stage_in_age_order(ops: Ops) -> None:
    for i in range(6):
        ops.create(f"op{i}", T0 + timedelta(seconds=i))
        ops.event(f"op{i}", StartStage(stage="ingest"), T0 + timedelta(seconds=i))
        if i % 2:
            ops.event(f"op{i}", SucceedStage(stage="ingest"), T0 + timedelta(seconds=i))
            ops.event(f"op{i}", StartStage(stage="geo"), T0 + timedelta(seconds=i))
    ops.event("op5", Heartbeat(stage="geo"), T0 + timedelta(seconds=14))  # geo of op5 is alive at 15 s
    assert ops.index.tick(T0.timestamp() + 40)  # ingest past its 10 s deadline; geo of op1, op3: no heartbeat
    stuck = OperationFilter(stuck=True)
    assert [op.id for op in ops.index.query(stuck, 10)[0]] == ["op4", "op3", "op2", "op1", "op0"]
    page, cursor = ops.index.query(OperationFilter(stuck=True, newest_first=False), 2)
    assert [op.id for op in page] == ["op0", "op1"] and cursor is not None
    assert [op.id for op in ops.index.query(OperationFilter(stuck=True, newest_first=False), 2, cursor)[0]] == [
        "op2",
        "op3",
    ]
    assert [op.id for op in ops.index.query(OperationFilter(stuck=True, stage="geo"), 10)[0]] == ["op3", "op1"]
    assert ops.index.count(OperationFilter(stuck=True, stage="ingest")) == 3
    ops.event("op0", SucceedStage(stage="ingest"), T0 + timedelta(seconds=41))  # progress clears it
    assert ops.index.count(stuck) == 4 and ops.index.count(OperationFilter()) == 6


def test_query_filters_and_keyset_pages(ops: Ops) -> None:
    for i in range(12):
        ops.create(f"op{i:02d}", T0 + timedelta(seconds=i), {"customer": f"c{i % 3}", "nested": {"x": 1}})
        if i % 2:
            ops.event(f"op{i:02d}", StartStage(stage="ingest", worker=f"w{i % 4}"), T0 + timedelta(seconds=i))
    newest = OperationFilter()
    seen: list[str] = []
    cursor = None
    while True:
        page, cursor = ops.index.query(newest, 5, cursor)
        seen += [op.id for op in page]
        if cursor is None:
            break
    assert seen == [f"op{i:02d}" for i in reversed(range(12))]
    oldest, cursor = ops.index.query(OperationFilter(newest_first=False), 5)
    assert [op.id for op in oldest] == [f"op{i:02d}" for i in range(5)]
    second, _ = ops.index.query(OperationFilter(newest_first=False), 5, cursor)
    assert second[0].id == "op05"
    running = ops.index.query(OperationFilter(statuses=frozenset({"running"})), 50)[0]
    assert {op.id for op in running} == {f"op{i:02d}" for i in range(1, 12, 2)}
    assert {op.id for op in ops.index.query(OperationFilter(stage="ingest"), 50)[0]} == {op.id for op in running}
    waiting = OperationFilter(stage="ingest", stage_status=StageStatus.WAITING)
    assert ops.index.count(waiting) == 6
    assert {op.id for op in ops.index.query(OperationFilter(worker="w1"), 50)[0]} == {"op01", "op05", "op09"}
    assert ops.index.count(OperationFilter(meta_key="customer", meta_value="c0")) == 4
    assert ops.index.count(OperationFilter(meta_key="nested")) == 0  # only scalar values are indexed
    assert ops.index.count(OperationFilter(id_prefix="op1")) == 2
    after = (T0 + timedelta(seconds=10)).timestamp()
    assert ops.index.count(OperationFilter(created_after=after)) == 2


def test_recent_failures_keep_the_newest(ops: Ops) -> None:
    for i in range(30):
        op_id = f"f{i:02d}"
        at = T0 + timedelta(seconds=i)
        ops.create(op_id, at)
        ops.event(op_id, StartStage(stage="ingest"), at)
        ops.event(op_id, FailStage(stage="ingest", error=f"boom {i}", retryable=False), at)
    failures = ops.index.recent_failures(5)
    assert [f.op_id for f in failures] == ["f29", "f28", "f27", "f26", "f25"]
    assert failures[0].stage == "ingest" and failures[0].message == "boom 29"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["start", "succeed", "fail", "cancel", "remove"]),
                          st.sampled_from(["ingest", "geo", "fraud"])), max_size=60))  # fmt: skip
def test_incremental_counts_equal_a_full_recount(steps: list[tuple[int, str, str]]) -> None:
    index = OperationIndex(stats_window=900)
    index.set_pipeline(PIPELINE)
    ops = Ops(index)
    at = T0
    for number, action, stage in steps:
        at += timedelta(seconds=1)
        op_id = f"op{number}"
        if op_id not in ops.current:
            ops.create(op_id, at)
            continue
        if action == "remove":
            ops.remove(op_id)
            continue
        event = {
            "start": StartStage(stage=stage),
            "succeed": SucceedStage(stage=stage),
            "fail": FailStage(stage=stage, error="x", retryable=number % 2 == 0),
            "cancel": Cancel(),
        }[action]
        try:
            ops.event(op_id, event, at)
        except Exception:  # noqa: BLE001 - illegal transitions are the machine's business, not the index's
            continue
    expected = brute_stage_counts(ops.current)
    stats = index.stage_stats(PIPELINE, at.timestamp())
    for name, counts in expected.items():
        assert stats[name].counts == counts
    statuses: dict[str, int] = {}
    for op in ops.current.values():
        statuses[op.status.value] = statuses.get(op.status.value, 0) + 1
    assert index.status_counts() == statuses
    assert len(index) == len(ops.current)
    assert [op.id for op in index.query(OperationFilter(newest_first=False), 100)[0]] == sorted(
        ops.current, key=lambda i: (ops.current[i].created_at.timestamp(), i)
    )


def test_bulk_load_sorts_once(ops: Ops) -> None:
    ops.index.begin_bulk()
    for i in reversed(range(5)):
        ops.create(f"b{i}", T0 + timedelta(seconds=i))
    ops.index.end_bulk()
    assert [op.id for op in ops.index.query(OperationFilter(newest_first=False), 10)[0]] == [f"b{i}" for i in range(5)]
