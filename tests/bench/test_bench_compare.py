"""The head-to-head comparison on a tiny workload: real servers, real checker, injected faults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import msgspec
import pytest

import bench.compare
from bench.baseline.document import (
    CreateOperation,
    MetadataPatch,
    OperationDocument,
    StageEvent,
    apply_stage_event,
    guard_metadata_patch,
    merge_metadata_patch,
    new_document,
    shared_metadata,
)
from bench.compare import CompareOptions, SystemResult, evaluate_targets, format_table, main, run_comparison
from bench.compare_check import CheckResult, check_run
from bench.compare_servers import ArchiverProcess, PgUsage
from bench.compare_systems import KvstateSystem, document_view, operation_view
from bench.workload import (
    Delivery,
    Message,
    MessageKind,
    OperationPlan,
    RunRecord,
    StageView,
    View,
    WorkloadOptions,
    load_pipeline,
    plan_workload,
    run_workload,
    shared_writers,
)
from kvstate import Client, Operation, Settings, StageState, StageStatus

OPTIONS = WorkloadOptions(ops=30, concurrency=8, seed=7)


def test_plans_are_deterministic_and_cover_retries_redeliveries_and_late_messages() -> None:
    pipeline = load_pipeline()
    plans = plan_workload(pipeline, WorkloadOptions(ops=300, seed=3))
    assert plans == plan_workload(pipeline, WorkloadOptions(ops=300, seed=3))
    assert len(pipeline.stages) == 10
    stages = [stage for plan in plans for stage in plan.stages.values()]
    assert any(m.kind is MessageKind.FAIL for s in stages for m in s.messages)
    assert any(m.kind is MessageKind.SKIP for s in stages for m in s.messages)
    assert any(s.redelivered for s in stages)
    assert any(s.late for s in stages)
    assert all(e.status in ("succeeded", "skipped") for plan in plans for e in plan.expected.values())


def test_plans_patch_metadata_and_deliver_superseded_and_overtaken_patches_late() -> None:
    pipeline = load_pipeline()
    plans = plan_workload(pipeline, WorkloadOptions(ops=300, seed=3))
    assert shared_writers(pipeline) == ["ingest", "validate", "merge", "score", "persist"]
    for plan in plans:
        for name, expected in plan.expected.items():
            # every attempt of a stage that ran patches the stage's namespace, naming its attempt
            assert [p.attempt for p in plan.stage_patches(name)] == list(range(1, expected.attempt + 1))
        # each shared patch expects the version the writer before it left
        shared = plan.shared_patches
        assert [p.stage for p in shared] == shared_writers(pipeline)
        assert [p.expect for p in shared] == [{"decision_version": v or None} for v in range(len(shared))]
    late = [(plan, name, m) for plan in plans for name, s in plan.stages.items() for m in s.late]
    superseded = [m for plan, name, m in late if m.kind is MessageKind.STAGE_METADATA]
    overtaken = [(plan, name, m) for plan, name, m in late if m.kind is MessageKind.SHARED_METADATA]
    assert superseded
    assert all(m.attempt < plan.expected[m.stage].attempt for plan, _, m in late if m in superseded)
    assert overtaken
    # an overtaken shared patch is delivered late by the next writer, after that writer's own patch
    writers = shared_writers(pipeline)
    assert all(writers.index(name) == writers.index(m.stage) + 1 for _, name, m in overtaken)
    assert any(m.event_id.endswith(".resent") for _, _, m in overtaken)
    assert any(not m.event_id.endswith(".resent") for _, _, m in overtaken)


async def test_one_command_compares_all_three_systems_and_only_kvstate_is_clean() -> None:
    plans = plan_workload(load_pipeline(), OPTIONS)
    assert any(stage.late for plan in plans for stage in plan.stages.values())
    late_kinds = {m.kind for plan in plans for stage in plan.stages.values() for m in stage.late}
    assert {MessageKind.STAGE_METADATA, MessageKind.SHARED_METADATA} <= late_kinds
    # Server directories go under /tmp: a PostgreSQL socket path must stay under 107 bytes.
    options = CompareOptions(workload=OPTIONS, pairs=("fast",), timeout=100.0)
    results = {r.system: r for r in await run_comparison(options)}

    kv, careful, naive = results["kvstate"], results["careful"], results["naive"]
    expected_updates = sum(plan.message_count for plan in plans)
    for r in results.values():
        assert r.updates == expected_updates
        assert r.errors == 0, r.error_examples
        assert r.updates_per_second > 0
    assert kv.check.clean, kv.check.examples
    assert not kv.failed, kv.note
    assert kv.outcomes["applied"] > 0
    assert kv.outcomes["duplicate"] > 0  # redelivered messages, recognised by their event id
    assert kv.outcomes["stale"] > 0  # late messages with a new event id, refused by the state machine
    assert kv.check.metadata_checked >= OPTIONS.ops  # stage and shared patches were checked
    # Row locks stop lost updates but not reordered messages; last-writer-wins loses both.
    assert careful.check.lost_updates == 0
    assert careful.check.stale_writes > 0
    assert naive.check.lost_updates > 0
    assert naive.check.stale_writes > 0
    # The careful service's attempt and expect checks refuse late patches; a blind jsonb merge applies them.
    assert careful.outcomes["stale_metadata"] > 0
    assert naive.check.stale_metadata > careful.check.stale_metadata
    # PostgreSQL was measured for the baselines and for kvstate's archive, which the check read back.
    assert naive.pg is not None
    assert naive.pg.wal_bytes > 0
    assert naive.pg.dead_tuples_made >= expected_updates
    assert kv.pg is not None, kv.note
    assert "archive" in kv.note
    assert kv.pg.rows_inserted >= OPTIONS.ops
    assert kv.pg.wal_bytes < naive.pg.wal_bytes
    # The archiver ran as a process during the workload, and kvstate's clock waited for it.
    assert kv.archived is not None
    assert kv.archived["archived"] == OPTIONS.ops
    assert kv.archived["removed"] == OPTIONS.ops
    assert kv.archiver_cpu_seconds is not None
    assert kv.archiver_cpu_seconds > 0
    assert kv.archive_tail_seconds is not None
    assert kv.elapsed >= kv.workload_seconds + kv.archive_tail_seconds - 1e-6
    assert kv.updates_per_second == pytest.approx(kv.updates / kv.elapsed)
    # One client per stage service plus the producer: nothing merges writes across services.
    assert kv.outcomes["kv_clients"] == 11
    assert kv.outcomes["kv_writes"] >= kv.outcomes["applied"]
    assert kv.conflicts == kv.outcomes["kv_conflicts"]
    assert naive.conflicts is None
    assert "kvstate" in format_table(list(results.values()))


async def test_checker_detects_an_injected_lost_update_and_a_stale_final_state(settings: Settings) -> None:
    pipeline = load_pipeline()
    options = WorkloadOptions(ops=6, concurrency=3, seed=11)
    plans = plan_workload(pipeline, options)
    async with Client(settings, create_bucket=True) as client:
        await client.set_pipeline(pipeline)
        system = KvstateSystem(client, pipeline)
        record = await run_workload(system, pipeline, plans, options, timeout=60)
        assert check_run(plans, record, await system.final_views()).clean

        lost_key, stale_key, stale_metadata_key = plans[0].key, plans[1].key, plans[2].key

        def drop_geo_metadata(op: Operation) -> Operation:
            stages = {**op.stages, "geo": msgspec.structs.replace(op.stages["geo"], metadata={})}
            return msgspec.structs.replace(op, stages=stages)

        def audit_back_to_running(op: Operation) -> Operation:
            old = op.stages["audit"]
            stages = {
                **op.stages,
                "audit": StageState(status=StageStatus.RUNNING, attempt=old.attempt, metadata=old.metadata),
            }
            return msgspec.structs.replace(op, stages=stages)

        def decision_back_to_version_3(op: Operation) -> Operation:
            older = plans[2].shared_patches[2].metadata
            assert older is not None
            return msgspec.structs.replace(op, metadata={**op.metadata, **older})

        assert (await client.update(lost_key, drop_geo_metadata)).applied
        assert (await client.update(stale_key, audit_back_to_running)).applied
        assert (await client.update(stale_metadata_key, decision_back_to_version_3)).applied
        result = check_run(plans, record, await system.final_views())

    assert result.lost_updates == 2  # geo's result and its progress patch
    assert result.wrong_final == 1
    assert result.stale_metadata == 1
    assert any(lost_key in e and "geo" in e for e in result.examples)
    assert any(stale_key in e and "audit running" in e for e in result.examples)
    assert any(stale_metadata_key in e and "shared metadata holds" in e for e in result.examples)


def test_checker_counts_a_write_that_moves_a_stage_backwards() -> None:
    pipeline = load_pipeline()
    plan = plan_workload(pipeline, WorkloadOptions(ops=1, seed=5))[0]
    final = View(
        9,
        "succeeded",
        {name: StageView(e.status, e.attempt, e.metadata) for name, e in plan.expected.items()},
    )
    geo = plan.expected["geo"]
    done = View(1, "running", {"geo": StageView("succeeded", geo.attempt, geo.metadata)})
    undone = View(2, "running", {"geo": StageView("running", geo.attempt, None)})
    message = Message("geo", MessageKind.START, geo.attempt, "e", "geo-0")
    record = RunRecord("test", [Delivery(plan.key, message, 0.001, v) for v in (undone, done)])

    result = check_run([plan], record, {plan.key: final})

    assert result.stale_writes == 1
    assert result.lost_updates == 0
    assert result.wrong_final == 0


def _correct_final(plan: OperationPlan) -> View:
    """The final state ``plan`` should leave: every stage's result and final patch, the last shared patch."""
    stages = {}
    for name, expected in plan.expected.items():
        metadata: dict[str, object] = dict(expected.metadata or {})
        for patch in plan.stage_patches(name)[-1:]:
            metadata |= patch.metadata or {}
        stages[name] = StageView(expected.status, expected.attempt, metadata or None)
    return View(99, "succeeded", stages, dict(plan.shared_patches[-1].metadata or {}))


def _every_message_acknowledged(plan: OperationPlan) -> RunRecord:
    messages = [m for stage in plan.stages.values() for m in stage.messages]
    return RunRecord("test", [Delivery(plan.key, m, 0.001, None) for m in messages])


def _retried_plan() -> tuple[OperationPlan, str]:
    """A planned operation with a stage that needed more than one attempt, and that stage."""
    for plan in plan_workload(load_pipeline(), WorkloadOptions(ops=50, seed=5)):
        for name, expected in plan.expected.items():
            if expected.attempt > 1:
                return plan, name
    raise AssertionError("no retried stage in 50 planned operations")


def test_checker_counts_metadata_of_a_superseded_attempt_and_an_overtaken_shared_patch() -> None:
    plan, retried = _retried_plan()
    record = _every_message_acknowledged(plan)
    assert check_run([plan], record, {plan.key: _correct_final(plan)}).clean

    correct = _correct_final(plan)
    superseded = plan.stage_patches(retried)[0].metadata
    overtaken = plan.shared_patches[1].metadata
    assert superseded is not None
    assert overtaken is not None
    stage = correct.stages[retried]
    stages = {
        **correct.stages,
        retried: StageView(stage.status, stage.attempt, {**(stage.metadata or {}), **superseded}),
    }
    stale = View(99, "succeeded", stages, {**correct.metadata, **overtaken})

    result = check_run([plan], record, {plan.key: stale})

    assert result.stale_metadata == 2
    assert result.lost_updates == 0
    assert result.wrong_final == 0
    assert result.stale_writes == 0
    assert not result.clean
    assert any(f"{retried} holds the patch of {plan.stage_patches(retried)[0].event_id}" in e for e in result.examples)
    assert any(f"shared metadata holds the patch of {plan.shared_patches[1].event_id}" in e for e in result.examples)


def test_checker_counts_a_patch_the_final_state_holds_none_of_as_lost_not_stale() -> None:
    plan, retried = _retried_plan()
    correct = _correct_final(plan)
    stage = correct.stages[retried]
    without_progress = {k: v for k, v in (stage.metadata or {}).items() if k != "progress"}
    stages = {**correct.stages, retried: StageView(stage.status, stage.attempt, without_progress)}

    result = check_run([plan], _every_message_acknowledged(plan), {plan.key: View(99, "succeeded", stages, {})})

    assert result.lost_updates == 2  # the stage's final patch and the newest shared patch
    assert result.stale_metadata == 0


def test_checker_judges_metadata_by_the_newest_acknowledged_patch() -> None:
    plan, retried = _retried_plan()
    correct = _correct_final(plan)
    final_patch = plan.stage_patches(retried)[-1]
    stage = correct.stages[retried]
    older = plan.stage_patches(retried)[0].metadata or {}
    stages = {**correct.stages, retried: StageView(stage.status, stage.attempt, {**(stage.metadata or {}), **older})}
    record = _every_message_acknowledged(plan)
    record.deliveries = [
        dataclasses.replace(d, error="TimeoutError()") if d.message == final_patch else d for d in record.deliveries
    ]

    result = check_run([plan], record, {plan.key: View(99, "succeeded", stages, correct.metadata)})

    # the final attempt's patch failed, so the older one is the newest the stage could hold
    assert result.stale_metadata == 0
    assert result.clean, result.examples


def test_operation_view_reads_stage_metadata_and_attempts() -> None:
    op = msgspec.json.decode(
        b'{"schema":1,"id":"a","pipeline":"orders","status":"running","created_at":"2024-01-01T00:00:00Z",'
        b'"updated_at":"2024-01-01T00:00:00Z","stages":{"geo":{"status":"succeeded","attempt":2,'
        b'"metadata":{"token":"t"}},"fraud":{"status":"waiting"}}}',
        type=Operation,
    )
    view = operation_view(msgspec.structs.replace(op, revision=5))
    assert view.order == 5
    assert view.stages["geo"] == StageView("succeeded", 2, {"token": "t"})
    assert view.stages["fraud"] == StageView("waiting", 0, None)
    assert view.metadata == {}


def test_command_writes_json_and_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ops", "0"], {}) == 2
    with pytest.raises(SystemExit):
        main(["--pairs", "nope"], {})
    out = tmp_path / "result.json"
    code = main(
        ["--ops", "5", "--concurrency", "2", "--pairs", "fast", "--systems", "careful", "--out", str(out)],
        {},
    )
    assert code == 0
    document = json.loads(out.read_text())
    assert document["results"][0]["system"] == "careful"
    assert document["results"][0]["check"]["lost_updates"] == 0
    assert document["machine"]["cores"] >= 1
    assert "careful" in capsys.readouterr().out


async def test_archiver_process_is_stopped_when_the_kvstate_run_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[ArchiverProcess] = []

    class RecordedArchiver(ArchiverProcess):
        async def start(self, timeout: float = 60.0) -> None:
            started.append(self)
            await super().start(timeout)

    async def broken_workload(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the workload broke")

    monkeypatch.setattr(bench.compare, "ArchiverProcess", RecordedArchiver)
    monkeypatch.setattr(bench.compare, "run_workload", broken_workload)
    options = CompareOptions(workload=WorkloadOptions(ops=2, concurrency=1), pairs=("fast",), systems=("kvstate",))

    [result] = await run_comparison(options)

    assert result.failed
    assert "the workload broke" in result.note
    assert len(started) == 1
    assert started[0].proc is not None
    assert started[0].proc.poll() is not None  # stopped, not left running
    assert evaluate_targets([result])[0][1] == "not measured"
    assert "run failed" in format_table([result])


async def test_a_message_for_an_archived_operation_is_counted_not_raised(settings: Settings) -> None:
    pipeline = load_pipeline()
    async with Client(settings, create_bucket=True) as client:
        await client.set_pipeline(pipeline)
        system = KvstateSystem(client, pipeline)
        await system.create("gone")
        await client.remove("gone", (await client.get("gone")).revision)

        view = await system.deliver("gone", Message("geo", MessageKind.START, 1, "late", "geo-0"))

    assert view is None
    assert system.counters["not_found"] == 1


# ---------------------------------------------------------------------- targets


def _result(
    system: str, rate: float, *, wal: int | None = 1000, clean: bool = True, pair: str = "fast"
) -> SystemResult:
    check = CheckResult(operations=10, lost_updates=0 if clean else 3)
    pg = None if wal is None else PgUsage(wal, 1.0, 10, 0, 0, 0, 0, 0, 8192)
    return SystemResult(pair, system, 10, updates=100, updates_per_second=rate, check=check, pg=pg)


def _statuses(results: list[SystemResult]) -> dict[str, str]:
    return {target.split(": ", 1)[1]: status for target, status, _ in evaluate_targets(results)}


def test_targets_are_met_by_measured_figures_only() -> None:
    statuses = _statuses([_result("naive", 100, wal=20_000), _result("careful", 150), _result("kvstate", 200)])

    assert statuses == {
        "kvstate 0 lost updates, 0 stale writes, 0 stale metadata, 0 wrong final states": "met",
        "kvstate updates/s >= careful baseline": "met",
        "kvstate updates/s >= 1.2x naive baseline": "met",
        "PostgreSQL WAL/op >= 15x below naive": "met",
    }


def test_targets_missed_when_kvstate_loses_updates_or_is_slower() -> None:
    statuses = _statuses(
        [_result("naive", 190, wal=2_000), _result("careful", 250), _result("kvstate", 200, clean=False)]
    )

    assert set(statuses.values()) == {"missed"}


def test_stale_metadata_alone_misses_the_correctness_target() -> None:
    kv = _result("kvstate", 200)
    kv.check.stale_metadata = 1

    [(target, status, figures)] = evaluate_targets([kv])

    assert "0 stale metadata" in target
    assert status == "missed"
    assert "stale metadata 1" in figures
    assert "stale meta" in format_table([kv]).splitlines()[0]


def test_a_failed_kvstate_run_meets_no_target() -> None:
    failed = SystemResult("fast", "kvstate", 10, failed=True, note="run failed: RuntimeError()")

    statuses = _statuses([_result("naive", 100, wal=20_000), _result("careful", 150), failed])

    assert set(statuses.values()) == {"not measured"}


def test_a_failed_baseline_or_a_missing_wal_figure_is_not_measured() -> None:
    failed_careful = SystemResult("strict", "careful", 10, failed=True, note="run failed: OSError()")
    statuses = _statuses(
        [_result("naive", 100, wal=None, pair="strict"), failed_careful, _result("kvstate", 200, pair="strict")]
    )

    assert statuses["kvstate updates/s >= careful baseline"] == "not measured"
    assert statuses["kvstate updates/s >= 1.2x naive baseline"] == "met"
    assert statuses["PostgreSQL WAL/op >= 15x below naive"] == "not measured"
    assert statuses["kvstate 0 lost updates, 0 stale writes, 0 stale metadata, 0 wrong final states"] == "met"


def test_an_unchecked_kvstate_run_does_not_meet_the_correctness_target() -> None:
    unchecked = _result("kvstate", 200)
    unchecked.check = CheckResult()  # the checker never ran: nothing found because nothing was read

    [correctness] = evaluate_targets([unchecked])

    assert correctness[1] == "not measured"


# ---------------------------------------------------------------------- the baseline's metadata rules


def _document() -> OperationDocument:
    doc = new_document(CreateOperation(id="a", pipeline="orders", stages={"geo": False, "fraud": False}))
    doc = apply_stage_event(doc, StageEvent(stage="geo", kind="start", attempt=2))
    return merge_metadata_patch(doc, MetadataPatch(patch={"decision_version": 3, "decision": {"by": "merge"}}))


def test_the_careful_guard_refuses_an_older_attempt_and_an_unmet_expectation() -> None:
    doc = _document()

    older = MetadataPatch(patch={"progress": 1}, stage="geo", attempt=1)
    current = MetadataPatch(patch={"progress": 2}, stage="geo", attempt=2)
    overtaken = MetadataPatch(patch={"decision_version": 3}, expect={"decision_version": 2})
    next_one = MetadataPatch(patch={"decision_version": 4}, expect={"decision_version": 3})
    first = MetadataPatch(patch={"owner": "x"}, expect={"owner": None})

    assert guard_metadata_patch(doc, older) == "metadata of attempt 1; stage geo is at attempt 2"
    assert guard_metadata_patch(doc, current) is None
    assert guard_metadata_patch(doc, overtaken) == "metadata 'decision_version' is 3, the patch expected 2"
    assert guard_metadata_patch(doc, next_one) is None
    assert guard_metadata_patch(doc, first) is None  # null: absent
    with pytest.raises(KeyError):
        guard_metadata_patch(doc, MetadataPatch(patch={}, stage="nope"))


def test_the_blind_merge_replaces_top_level_members_and_keeps_stage_results() -> None:
    doc = merge_metadata_patch(_document(), MetadataPatch(patch={"progress": {"attempt": 2}}, stage="geo"))
    doc = apply_stage_event(doc, StageEvent(stage="geo", kind="succeed", attempt=2, metadata={"token": "t"}))
    doc = merge_metadata_patch(doc, MetadataPatch(patch={"progress": {"attempt": 1}}, stage="geo"))  # late, applied

    assert doc.metadata["geo"] == {"progress": {"attempt": 1}, "token": "t"}
    assert shared_metadata(doc) == {"decision_version": 3, "decision": {"by": "merge"}}
    assert document_view(doc).metadata == shared_metadata(doc)
    assert document_view(doc).stages["geo"].metadata == {"progress": {"attempt": 1}, "token": "t"}
