"""The in-memory index: incremental counts, queries, stuck detection, corrupt values (pure, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from unittest.mock import patch

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.index import OperationIndex
from dashboard.planner import OperationFilter
from dashboard.sorted_keys import SortedKeys
from dashboard.summary import CORRUPT, STAGE_STATUSES, OpSummary
from kvstate import Change, CorruptValue, Operation, OpStatus, Pipeline, StageSpec, StageStatus
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
REFUNDS = Pipeline(
    name="refunds",
    heartbeat_timeout=20.0,
    stages=(StageSpec(name="ingest"), StageSpec(name="review", after=("ingest",), deadline=5.0)),
)
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


class Ops:
    """Builds operations through the real state machine and feeds them to an index with revisions."""

    def __init__(self, index: OperationIndex) -> None:
        self.index = index
        self.revision = 0
        self.current: dict[str, Operation] = {}
        self.corrupt: set[str] = set()

    def put(self, op: Operation, now: datetime) -> Operation:
        self.revision += 1
        import msgspec

        op = msgspec.structs.replace(op, revision=self.revision)
        self.current[op.id] = op
        self.corrupt.discard(op.id)
        self.index.apply(Change(op.id, self.revision, op), now.timestamp())
        return op

    def create(
        self, op_id: str, at: datetime, metadata: dict[str, object] | None = None, pipeline: Pipeline = PIPELINE
    ) -> Operation:
        return self.put(new_operation(op_id, pipeline, at, metadata or {}), at)

    def event(self, op_id: str, event: object, at: datetime) -> Operation:
        op = self.current[op_id]
        pipeline = REFUNDS if op.pipeline == REFUNDS.name else PIPELINE
        decision = apply_event(op, pipeline, event, at)  # type: ignore[arg-type]
        return self.put(decision.operation, at)

    def remove(self, op_id: str) -> None:
        self.revision += 1
        self.current.pop(op_id, None)
        self.corrupt.discard(op_id)
        self.index.apply(Change(op_id, self.revision, None, deleted=True), T0.timestamp())

    def spoil(self, op_id: str, at: datetime) -> None:
        """Store a value that is not an operation under ``op_id``."""
        self.revision += 1
        self.current.pop(op_id, None)
        self.corrupt.add(op_id)
        error = CorruptValue(f"op.{op_id}", self.revision, "not json", b"{oops")
        self.index.apply(Change(op_id, self.revision, None, error=error), at.timestamp())


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


def test_bulk_load_builds_the_selective_orders_at_the_end(ops: Ops) -> None:
    ops.index.begin_bulk()
    for i in reversed(range(6)):
        ops.create(f"b{i}", T0 + timedelta(seconds=i))
        if i % 3 == 0:
            ops.event(f"b{i}", StartStage(stage="ingest", worker="w7"), T0 + timedelta(seconds=i))
    assert [op.id for op in ops.index.query(OperationFilter(worker="w7"), 10)[0]] == ["b3", "b0"]  # while loading
    ops.index.end_bulk()
    assert [op.id for op in ops.index.query(OperationFilter(worker="w7"), 10)[0]] == ["b3", "b0"]
    ops.event("b1", StartStage(stage="ingest", worker="w7"), T0 + timedelta(seconds=7))
    page, cursor = ops.index.query(OperationFilter(worker="w7", newest_first=False), 2)
    assert [op.id for op in page] == ["b0", "b1"]
    assert [op.id for op in ops.index.query(OperationFilter(worker="w7", newest_first=False), 2, cursor)[0]] == ["b3"]


def test_a_selective_filter_checks_only_its_candidates(ops: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(300):
        ops.create(f"op{i:03d}", T0 + timedelta(seconds=i))
        ops.event(f"op{i:03d}", StartStage(stage="ingest", worker="rare" if i % 100 == 7 else "w1"), T0)
    ops.event("op107", SucceedStage(stage="ingest"), T0 + timedelta(seconds=1))
    ops.event("op107", StartStage(stage="geo", worker="w1"), T0 + timedelta(seconds=1))
    checked: list[str] = []
    matches = OperationFilter.matches

    def counting(flt: OperationFilter, op: OpSummary) -> bool:
        checked.append(op.id)
        return matches(flt, op)

    monkeypatch.setattr(OperationFilter, "matches", counting)
    assert [op.id for op in ops.index.query(OperationFilter(worker="rare"), 50)[0]] == ["op207", "op107", "op007"]
    assert sorted(checked) == ["op007", "op107", "op207"]
    checked.clear()
    assert ops.index.query(OperationFilter(statuses=frozenset({"cancelled"})), 50) == ([], None)
    assert ops.index.count(OperationFilter(stage="geo", statuses=frozenset({"running"}))) == 1
    assert ops.index.query(OperationFilter(stage="fraud", stage_status=StageStatus.FAILED), 50) == ([], None)
    assert checked == ["op107"]  # geo running: one candidate; nothing cancelled, no fraud failed
    checked.clear()
    newest = ops.index.query(OperationFilter(created_before=(T0 + timedelta(seconds=3)).timestamp()), 50)[0]
    assert [op.id for op in newest] == ["op002", "op001", "op000"] and len(
        checked
    ) == 3  # the range is cut by bisection


# ---------------------------------------------------------------------- indexed pages equal a full walk

SECONDS = st.integers(0, 70).map(lambda s: T0.timestamp() + s)
FILTER_TERMS = {
    "statuses": st.frozensets(st.sampled_from([*(s.value for s in OpStatus), CORRUPT]), min_size=1, max_size=3),
    "pipeline": st.sampled_from(["orders", "refunds", "nope"]),
    "stage": st.sampled_from(["ingest", "geo", "review", "nope"]),
    "stage_status": st.sampled_from(STAGE_STATUSES),
    "worker": st.sampled_from(["w1", "w2", "w3", "nobody"]),
    "id_prefix": st.sampled_from(["op", "op1", "x"]),
    "created_after": SECONDS,
    "created_before": SECONDS,
    "meta_key": st.sampled_from(["customer", "other"]),
    "meta_value": st.sampled_from(["c0", "c1"]),
    "stuck": st.just(True),
}


@st.composite
def filters(draw: st.DrawFn) -> OperationFilter:
    """A filter of a few terms (a stage status comes with its stage, as the query parser wants)."""
    terms = draw(st.sets(st.sampled_from(sorted(FILTER_TERMS)), max_size=3))
    values = {name: draw(FILTER_TERMS[name]) for name in sorted(terms)}
    if "stage_status" in values and "stage" not in values:
        values["stage"] = draw(FILTER_TERMS["stage"])
    return OperationFilter(**values, newest_first=draw(st.booleans()))


STEPS = st.lists(
    st.tuples(
        st.integers(0, 9),
        st.sampled_from(
            [
                *["start"] * 4,
                *["succeed"] * 2,
                *["retry"] * 2,
                "fail",
                "cancel",
                "heartbeat",
                "remove",
                "corrupt",
                "tick",
            ]
        ),
        st.sampled_from(["ingest", "ingest", "geo", "fraud", "review"]),  # the others start after ingest
        st.sampled_from(["w1", "w2", "w3"]),
        st.integers(0, 2),  # seconds between steps: 0 makes operations created at the same time
    ),
    min_size=15,
    max_size=80,
)
CURSORS = st.none() | st.tuples(SECONDS, st.sampled_from(["op0", "op5", "op9", "zz", ""]))


def brute_page(
    rows: list[OpSummary], flt: OperationFilter, index: OperationIndex, limit: int, after: tuple[float, str] | None
) -> tuple[list[str], tuple[float, str] | None]:
    """The page a walk over every summary gives: filter, sort by (created, id), cut after the cursor."""

    def selected(op: OpSummary) -> bool:
        if flt.stuck:
            stuck = index.stuck_stages_of(op.id)
            if not stuck or (flt.stage is not None and flt.stage not in stuck):
                return False
        return flt.matches(op)

    keys = sorted(((op.created, op.id) for op in rows if selected(op)), reverse=flt.newest_first)
    if after is not None:
        keys = [k for k in keys if (k < after if flt.newest_first else k > after)]
    page = keys[:limit]
    return [k[1] for k in page], (page[-1] if len(keys) > limit else None)


@pytest.mark.parametrize("block", [2, 512])  # 2: the age orders split into blocks all the time
@settings(max_examples=200, deadline=None)
@given(STEPS, st.integers(0, 80), st.lists(filters(), min_size=1, max_size=8), st.integers(1, 4), CURSORS)
def test_indexed_pages_and_counts_equal_a_walk_over_every_operation(
    block: int,
    steps: list[tuple[int, str, str, str, int]],
    bulk_steps: int,
    filters: list[OperationFilter],
    limit: int,
    cursor: tuple[float, str] | None,
) -> None:
    with patch("dashboard.sorted_keys.BLOCK", block):
        check_indexed_pages(steps, bulk_steps, filters, limit, cursor)


def check_indexed_pages(
    steps: list[tuple[int, str, str, str, int]],
    bulk_steps: int,
    filters: list[OperationFilter],
    limit: int,
    cursor: tuple[float, str] | None,
) -> None:
    index = OperationIndex(stats_window=900)
    index.set_pipeline(PIPELINE)
    index.set_pipeline(REFUNDS)
    ops = Ops(index)
    at = T0
    if bulk_steps:
        index.begin_bulk()  # the first steps arrive as a replay, the rest one by one
    for n, (number, action, stage, worker, pause) in enumerate(steps):
        if n == bulk_steps:
            index.end_bulk()
        at += timedelta(seconds=pause)
        op_id = f"op{number}"
        if action == "tick":
            index.tick(at.timestamp())
        elif action == "remove" and (op_id in ops.current or op_id in ops.corrupt):
            ops.remove(op_id)
        elif action == "corrupt":
            ops.spoil(op_id, at)
        elif op_id not in ops.current:
            ops.create(op_id, at, {"customer": f"c{number % 3}"}, REFUNDS if number % 3 == 0 else PIPELINE)
        else:
            event = {
                "start": StartStage(stage=stage, worker=worker),
                "succeed": SucceedStage(stage=stage, worker=worker),
                "fail": FailStage(stage=stage, error="x", retryable=False, worker=worker),
                "retry": FailStage(stage=stage, error="x", retryable=True, worker=worker),
                "cancel": Cancel(),
                "heartbeat": Heartbeat(stage=stage, worker=worker),
            }[action]
            try:
                ops.event(op_id, event, at)
            except Exception:  # noqa: BLE001 - illegal transitions are the machine's business, not the index's
                continue
    index.end_bulk()
    index.tick(at.timestamp() + 60)
    ids = set(ops.current) | ops.corrupt
    assert len(index) == len(ids)
    rows = [summary for op_id in ids if (summary := index.get(op_id)) is not None]
    for flt in filters:
        everything = brute_page(rows, flt, index, len(rows) + 1, None)[0]
        assert index.count(flt) == len(everything)
        page_ids, next_cursor = brute_page(rows, flt, index, limit, cursor)
        found, after = index.query(flt, limit, cursor)
        assert ([op.id for op in found], after) == (page_ids, next_cursor)
        walked: list[str] = []
        after = None
        while True:  # every page through the cursors: the same rows as one brute-force list
            found, after = index.query(flt, limit, after)
            walked += [op.id for op in found]
            if after is None:
                break
            assert len(found) == limit
        assert walked == everything
    assert_each_term_checks_only_what_it_matches(index)


ONE_TERM_FILTERS = [
    *(OperationFilter(statuses=frozenset({s})) for s in [*(s.value for s in OpStatus), CORRUPT]),
    *(OperationFilter(pipeline=p) for p in ("orders", "refunds", "nope")),
    *(OperationFilter(worker=w) for w in ("w1", "w2", "w3", "nobody")),
    *(OperationFilter(stage=s) for s in ("ingest", "geo", "fraud", "review")),
    *(OperationFilter(stage=s, stage_status=st) for s in ("ingest", "geo", "fraud", "review") for st in STAGE_STATUSES),
]


def assert_each_term_checks_only_what_it_matches(index: OperationIndex) -> None:
    """A filter of one indexed term walks exactly the operations it matches: no stale or missing keys."""
    matches = OperationFilter.matches
    with patch.object(OperationFilter, "matches", autospec=True, side_effect=matches) as checks:
        for flt in ONE_TERM_FILTERS:
            checks.reset_mock()
            assert index.count(flt) == checks.call_count, flt


SORTED_KEY = st.tuples(st.integers(0, 12).map(float), st.sampled_from(["", "a", "a\0", "b"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), SORTED_KEY), max_size=80), st.none() | SORTED_KEY, st.none() | SORTED_KEY)
def test_sorted_keys_equal_a_sorted_list(
    steps: list[tuple[bool, tuple[float, str]]], low: tuple[float, str] | None, high: tuple[float, str] | None
) -> None:
    with patch("dashboard.sorted_keys.BLOCK", 2):
        keys, model = SortedKeys(), set()
        for add, key in steps:
            if add and key not in model:
                keys.add(key)
                model.add(key)
            elif not add:
                keys.discard(key)
                model.discard(key)
        ordered = sorted(model)
        inside = [k for k in ordered if (low is None or k >= low) and (high is None or k < high)]
        for built in (keys, SortedKeys(ordered)):
            assert list(built) == ordered and len(built) == len(ordered)
            assert list(built.walk(low, high, descending=False)) == inside
            assert list(built.walk(low, high, descending=True)) == inside[::-1]
            assert built.count(low, high) == len(inside)
