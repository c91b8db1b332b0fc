"""The synchronous client: same results and errors as the async one, from many threads and after fork()."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator

import pytest

from kvstate import ClientClosedError, OperationNotFound, Outcome, Settings, StageStatus
from kvstate.sync import SyncClient
from tests.conftest import PIPELINE


@pytest.fixture
def kv(settings: Settings) -> Iterator[SyncClient]:
    with SyncClient(settings, create_bucket=True) as client:
        client.set_pipeline(PIPELINE)
        yield client


def test_a_stage_reported_from_synchronous_code(kv: SyncClient) -> None:
    op = kv.create("orders", metadata={"order_id": "A-1"})
    assert kv.start(op.id, "ingest", worker="w", event_id="m1:start").outcome is Outcome.APPLIED
    done = kv.succeed(op.id, "ingest", metadata={"bytes": 3}, event_id="m1:done")
    assert done.operation.stage("ingest").status is StageStatus.SUCCEEDED
    assert kv.succeed(op.id, "ingest", event_id="m1:done").outcome is Outcome.DUPLICATE
    assert kv.get(op.id).revision == done.revision
    assert [o.id for o in kv.list(status="running")] == [op.id]


def test_errors_are_the_typed_kvstate_errors(kv: SyncClient) -> None:
    with pytest.raises(OperationNotFound):
        kv.get("nosuchid")


def test_many_threads_sharing_one_client_lose_no_update(kv: SyncClient) -> None:
    op = kv.create("orders")
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                kv.merge_metadata(op.id, {f"t{n}-{i}": i})
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert kv.get(op.id).metadata == {f"t{n}-{i}": i for n in range(16) for i in range(10)}


def test_a_forked_child_reports_through_a_connection_of_its_own(kv: SyncClient) -> None:
    op = kv.create("orders")
    kv.start(op.id, "ingest")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork() with threads running
        pid = os.fork()
    if pid == 0:  # the child: Celery's prefork worker, with the client its parent opened
        code = 1
        try:
            result = kv.succeed(op.id, "ingest", worker="child")
            code = 0 if result.outcome is Outcome.APPLIED else 2
            kv.close()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    after = kv.get(op.id)  # the parent's connection still works after the child closed its own
    assert after.stage("ingest").status is StageStatus.SUCCEEDED
    assert after.stage("ingest").worker == "child"


def test_it_refuses_use_outside_with_and_reopening(settings: Settings) -> None:
    client = SyncClient(settings, create_bucket=True)
    with pytest.raises(ClientClosedError):
        client.get("x")
    with client:
        client.set_pipeline(PIPELINE)
    with pytest.raises(ClientClosedError):
        client.create("orders")
    with pytest.raises(ClientClosedError), client:
        pass
