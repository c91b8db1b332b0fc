"""The archive, the overview, the list and the JSON API tell the same story about an operation.

Each derives nothing itself: the failed stage, the failure message and the terminal
statuses come from kvstate.derive. Generated event streams (the state machine's own
property-test strategy) check that they agree, so a copy of a rule creeping back into one
package shows up here.
"""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from archiver.rows import row_for
from dashboard.index import OperationIndex
from dashboard.resources import operation_resource, summary_resource
from kvstate import TERMINAL_STATUSES, Change, OpStatus, failed_stage, failure_message
from kvstate.events import Event
from tests.conftest import PIPELINE
from tests.test_derive import play
from tests.test_machine import T0, events


@settings(max_examples=300)
@given(st.lists(events, max_size=40))
def test_archive_overview_list_and_api_agree_on_any_operation(stream: list[Event]) -> None:
    op = play(stream)
    stage = failed_stage(op)
    index = OperationIndex(stats_window=10 * 365 * 86400.0)
    index.set_pipeline(PIPELINE)
    index.apply(Change(op.id, max(op.revision, 1), op), (T0 + timedelta(seconds=len(stream) + 1)).timestamp())

    summary = index.store.get(op.id)
    assert summary is not None and summary.status == op.status.value  # the list
    listed = summary_resource(summary)
    assert listed.done == (op.status in TERMINAL_STATUSES)

    resource = operation_resource(op)  # the JSON API
    assert resource.done == op.done
    failures = index.recent_failures()  # the overview
    if op.status is OpStatus.FAILED:
        assert resource.error is not None and resource.error.message == failure_message(op)
        assert [f.stage for f in failures] == [stage]
        assert stage in summary.failed_stages
    else:
        assert failures == []

    if op.done:  # the archive
        row = row_for(op, T0 + timedelta(days=1))
        assert row.status == op.status.value
        assert row.failed_stage == stage
