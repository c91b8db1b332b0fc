"""Trace ids: the W3C traceparent of a creation and of each attempt is recorded, bad ones refused."""

from __future__ import annotations

import pytest

from kvstate import Client, ValidationError
from kvstate.tracing import trace_id_from

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


def test_a_traceparent_and_a_bare_trace_id_give_the_trace_id() -> None:
    assert trace_id_from(PARENT) == TRACE
    assert trace_id_from(TRACE.upper()) == TRACE


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "00-xyz",
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-00f067aa0ba902b7",
        "<script>",
    ],
)
def test_anything_else_is_a_validation_error(bad: str) -> None:
    with pytest.raises(ValidationError):
        trace_id_from(bad)


async def test_the_trace_of_the_operation_and_of_each_attempt_is_recorded(client: Client) -> None:
    op = await client.create("orders", traceparent=PARENT)
    assert op.trace_id == TRACE
    other = "0af7651916cd43dd8448eb211c80319c"
    started = await client.start(op.id, "ingest", traceparent=f"00-{other}-b7ad6b7169203331-01")
    stage = started.operation.stage("ingest")
    assert stage.trace_id == other and (await client.get(op.id)).trace_id == TRACE
    with pytest.raises(ValidationError):
        await client.create("orders", traceparent="garbage")
    with pytest.raises(ValidationError):
        await client.start(op.id, "validate", traceparent="garbage")
    assert (await client.get(op.id)).revision == started.revision  # nothing written
