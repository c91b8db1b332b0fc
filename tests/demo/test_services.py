"""The simulated services are pure: poison fails where it should, the output document is built up."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from demo.orders import Poison, poison_of, random_order
from demo.runner import load_pipeline
from demo.services import SERVICES, StageFailure
from kvstate import Operation, new_operation
from kvstate.merge import merge_patch

PIPELINE = load_pipeline()


def operation(order: dict[str, object]) -> Operation:
    return new_operation("op1", PIPELINE, datetime.now(UTC), {"input": order})


def run_all(op: Operation, rng: random.Random) -> Operation:
    """Run every service once, in pipeline order, without transient failures; apply their results."""
    import msgspec

    for name in PIPELINE.stage_names:
        service = SERVICES[name]
        if service.skip(op) is not None:
            continue
        result = service.attempt(op, rng, failure_scale=0.0)
        stages = dict(op.stages)
        stages[name] = msgspec.structs.replace(stages[name], metadata=result.metadata)
        metadata = merge_patch(op.metadata, result.shared) if result.shared else op.metadata
        assert isinstance(metadata, dict)
        op = msgspec.structs.replace(op, stages=stages, metadata=metadata)
    return op


def test_every_pipeline_stage_has_a_service() -> None:
    assert set(PIPELINE.stage_names) == set(SERVICES)


def test_a_clean_order_builds_the_whole_output_document() -> None:
    rng = random.Random(1)
    order = random_order(rng, 1)
    assert poison_of(order) is None
    op = run_all(operation(order), rng)
    output = op.metadata["output"]
    assert isinstance(output, dict)
    assert output["status"] == "stored"
    assert output["order_number"] == "SO-0000001"
    assert output["subtotal_cents"] == sum(i["quantity"] * i["unit_price_cents"] for i in order["items"])  # type: ignore[attr-defined]
    assert set(output) >= {"shipping", "risk", "row_id", "audit_digest", "risk_signals"}


@pytest.mark.parametrize(
    ("poison", "stage", "retryable"),
    [
        (Poison.NEGATIVE_QUANTITY, "validate", False),
        (Poison.UNKNOWN_COUNTRY, "geo", True),
        (Poison.CARD_BIN_BLOCKED, "fraud", True),
    ],
)
def test_poison_fails_at_its_stage_on_every_attempt(poison: Poison, stage: str, retryable: bool) -> None:
    rng = random.Random(2)
    order = random_order(rng, 2, poison)
    assert poison_of(order) is poison
    op = operation(order)
    for _ in range(5):
        with pytest.raises(StageFailure) as failure:
            SERVICES[stage].attempt(op, rng, failure_scale=0.0)
        assert failure.value.retryable is retryable


def test_guest_orders_skip_profile_and_notify() -> None:
    rng = random.Random(3)
    orders = [random_order(rng, n) for n in range(200)]
    guest = next(o for o in orders if o["customer"] is None and poison_of(o) is None)
    op = run_all(operation(guest), rng)
    assert SERVICES["profile"].skip(op) is not None
    assert SERVICES["notify"].skip(op) is not None
    member = next(o for o in orders if o["customer"] is not None and poison_of(o) is None)
    op = run_all(operation(member), rng)
    assert SERVICES["profile"].skip(op) is None
    assert SERVICES["notify"].skip(op) is None


def test_latencies_are_positive_capped_and_scaled() -> None:
    rng = random.Random(4)
    for service in SERVICES.values():
        samples = [service.latency(rng, 1.0) for _ in range(500)]
        assert all(0 < s <= service.cap for s in samples)
        assert service.median / 3 < sorted(samples)[250] < service.median * 3
        assert service.latency(random.Random(5), 0.5) == pytest.approx(service.latency(random.Random(5), 1.0) / 2)


def test_transient_failures_follow_the_failure_scale() -> None:
    rng = random.Random(6)
    op = operation(random_order(rng, 6))
    service = SERVICES["geo"]
    failures: list[StageFailure] = []
    for _ in range(2000):
        try:
            service.attempt(op, rng, failure_scale=1.0)
        except StageFailure as failure:
            failures.append(failure)
    assert 0.04 < len(failures) / 2000 < 0.12  # geo fails 8% of attempts
    assert all(f.retryable for f in failures)
    for _ in range(200):
        service.attempt(op, rng, failure_scale=0.0)  # no transient failure at all
