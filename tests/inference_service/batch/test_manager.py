"""Batch jobs end to end in one process (LOCAL runner): lifecycle, durability, listing.

The object store is a real local folder; indexing goes to the real SearchService (SQLite). The
Spark runner has its own tests (tests/inference_service/batch/test_spark_local.py and the
standalone-cluster faults in tests/integration/batch).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from imagemesh.errors import AlreadyExists, InvalidArgument, NotFound
from inference_service.batch.jobs import JobMode, JobRecord, JobState, Selection, new_job_id
from inference_service.batch.keys import prediction_array_name
from inference_service.batch.local_runner import LocalRunner
from inference_service.batch.manager import (
    RESTART_REASON,
    BatchJobManager,
    BatchOptions,
    JobRequest,
)
from inference_service.batch.selection import GrpcSelectionResolver
from inference_service.batch.store import JobStore
from tests.inference_service.batch.helpers import MODEL_VERSION, put_images


def _put_indexed(store, search, count, *, start=0, dataset="generated"):
    """Stores images and indexes their documents, as the storage service does."""
    names = put_images(store, count, start=start)
    search.index_images(names, dataset)
    return names


class _NoSpark:
    """Stands in for the Spark runner where a test must prove Spark is NOT used."""

    mode_name = "SPARK"

    def run(self, spec, names, control):
        raise AssertionError("this job should have run locally")

    def cancel(self, control):
        pass


def _manager(store, storage_settings, search, **options):
    defaults = {"batch_size": 8, "io_threads": 4, "heartbeat_s": 0.2, "spark_threshold": 1000}
    defaults.update(options)
    return BatchJobManager(
        jobs=JobStore(store),
        options=BatchOptions(storage=storage_settings, search_address=search.address, **defaults),
        resolver=GrpcSelectionResolver("127.0.0.1:1", search.address),
        local_runner=LocalRunner(),
        spark_runner=_NoSpark(),
        resolve_model=lambda name: name or MODEL_VERSION,
    )


@pytest.fixture
def manager(store, storage_settings, search):
    manager = _manager(store, storage_settings, search)
    manager.start()
    yield manager
    manager.stop()


def _wait_final(manager, job_id, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = manager.get(job_id)
        if record.final:
            return record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish: {manager.get(job_id)}")


def test_a_job_runs_locally_to_success_and_its_record_says_so(manager, store, search):
    names = _put_indexed(store, search, 20)
    created = manager.create(JobRequest(selection=Selection(names=tuple(names))))
    assert created.state is JobState.PENDING
    assert created.total_count == 20

    done = _wait_final(manager, created.job_id)

    assert done.state is JobState.SUCCEEDED
    assert (done.processed_count, done.failed_count, done.total_count) == (20, 0, 20)
    assert done.mode is JobMode.LOCAL
    assert done.start_time is not None
    assert done.end_time >= done.start_time
    stored = JobStore(store).get(created.job_id)
    assert stored.state is JobState.SUCCEEDED
    assert stored.processed_count == 20
    assert stored.selection.names == tuple(names)
    for name in names:
        assert store.exists(prediction_array_name(MODEL_VERSION, name[7:]))


def test_a_job_over_the_threshold_in_auto_mode_goes_to_spark(store, storage_settings, search):
    manager = _manager(store, storage_settings, search, spark_threshold=2)
    manager.start()
    try:
        names = _put_indexed(store, search, 3)
        done = _wait_final(manager, manager.create(JobRequest(Selection(tuple(names)))).job_id)
    finally:
        manager.stop()
    assert done.state is JobState.FAILED
    assert "should have run locally" in done.error_message
    assert done.mode is JobMode.SPARK


def test_a_search_filter_selection_is_resolved_through_search(manager, store, search):
    names = _put_indexed(store, search, 7)
    elsewhere = _put_indexed(store, search, 3, start=7, dataset="elsewhere")
    created = manager.create(JobRequest(Selection(filter={"datasets": ["generated"]})))
    assert created.total_count == 0  # resolved when the job runs, not in the call

    done = _wait_final(manager, created.job_id)

    assert (done.state, done.total_count, done.processed_count) == (JobState.SUCCEEDED, 7, 7)
    # Only the filter's images were classified.
    assert sorted(search.predictions_by(MODEL_VERSION)) == sorted(names)
    for name in elsewhere:
        assert not store.exists(prediction_array_name(MODEL_VERSION, name[7:]))


async def test_watch_streams_progress_and_ends_at_the_final_state(manager, store, search):
    names = _put_indexed(store, search, 40)
    created = manager.create(JobRequest(Selection(tuple(names))))
    seen = [record async for record in manager.watch(created.job_id, interval_s=0.02)]

    assert seen[-1].state is JobState.SUCCEEDED
    assert seen[-1].processed_count == 40
    processed = [r.processed_count for r in seen]
    assert processed == sorted(processed)
    assert len(seen) >= 3  # the first state, some progress, the end


def test_cancel_stops_the_job_and_the_counts_say_what_was_done(manager, store, search):
    names = _put_indexed(store, search, 400)
    created = manager.create(JobRequest(Selection(tuple(names))))
    while manager.get(created.job_id).processed_count == 0:
        time.sleep(0.01)
    cancelling = manager.cancel(created.job_id)
    assert cancelling.state in (JobState.CANCELLING, JobState.CANCELLED)

    done = _wait_final(manager, created.job_id)

    assert done.state is JobState.CANCELLED
    assert 0 < done.processed_count < 400
    written = len(list(store.list_keys("arrays/predictions/")))
    assert written == done.processed_count
    assert manager.cancel(created.job_id) == manager.get(created.job_id)  # final: unchanged


def test_a_job_whose_service_died_is_reported_failed_after_a_restart(
    store, storage_settings, search
):
    # A real process that is gone: its pid is the owner of a RUNNING record.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = JobRecord(
        job_id=new_job_id(),
        state=JobState.RUNNING,
        selection=Selection(names=("images/" + "c" * 64,)),
        model_version=MODEL_VERSION,
        requested_mode=JobMode.SPARK,
        mode=JobMode.SPARK,
        total_count=1,
        owner={"host": os.uname().nodename, "pid": dead.pid, "instance": "gone"},
        heartbeat_time=time.time(),
    )
    JobStore(store).create(orphan)

    restarted = _manager(store, storage_settings, search)
    restarted.start()
    try:
        record = restarted.get(orphan.job_id)
    finally:
        restarted.stop()

    assert record.state is JobState.FAILED
    assert record.error_message == RESTART_REASON
    assert JobStore(store).get(orphan.job_id).state is JobState.FAILED


def test_a_record_whose_heartbeat_stopped_elsewhere_is_failed_on_read(
    store, storage_settings, search
):
    stale = JobRecord(
        job_id=new_job_id(),
        state=JobState.RUNNING,
        selection=Selection(names=("images/" + "d" * 64,)),
        model_version=MODEL_VERSION,
        requested_mode=JobMode.LOCAL,
        owner={"host": "another-host", "pid": 1, "instance": "x"},
        heartbeat_time=time.time() - 3600,
    )
    JobStore(store).create(stale)
    manager = _manager(store, storage_settings, search, lease_s=30)
    assert manager.get(stale.job_id).state is JobState.FAILED
    fresh = replace(stale, job_id=new_job_id(), heartbeat_time=time.time())
    JobStore(store).create(fresh)
    assert manager.get(fresh.job_id).state is JobState.RUNNING


def test_list_is_newest_first_paginated_and_filtered_by_state(manager, store, search):
    names = _put_indexed(store, search, 2)
    ids = []
    for _ in range(5):
        ids.append(manager.create(JobRequest(Selection(tuple(names)))).job_id)
        _wait_final(manager, ids[-1])
        time.sleep(0.002)  # distinct creation milliseconds
    first, token = manager.list(None, 2, "")
    second, token2 = manager.list(None, 2, token)
    third, token3 = manager.list(None, 2, token2)
    listed = [r.job_id for r in first + second + third]
    assert listed == list(reversed(ids))
    assert token
    assert token2
    assert not token3
    succeeded, _ = manager.list(JobState.SUCCEEDED, 50, "")
    assert len(succeeded) == 5
    assert manager.list(JobState.FAILED, 50, "") == ([], "")
    with pytest.raises(InvalidArgument, match="page_token"):
        manager.list(JobState.FAILED, 2, token)  # a token of another query
    with pytest.raises(InvalidArgument, match="page_size"):
        manager.list(None, 501, "")


def test_a_retried_request_id_returns_the_same_job_and_a_reused_one_is_refused(
    manager, store, search
):
    names = tuple(_put_indexed(store, search, 2))
    first = manager.create(JobRequest(Selection(names), request_id="client-42"))
    again = manager.create(JobRequest(Selection(names), request_id="client-42"))
    assert again.job_id == first.job_id
    with pytest.raises(AlreadyExists, match="client-42"):
        manager.create(JobRequest(Selection(names), top_k=2, request_id="client-42"))
    _wait_final(manager, first.job_id)


def test_bad_requests_are_refused_with_the_field_and_nothing_is_stored(manager, store, search):
    with pytest.raises(InvalidArgument, match="selection is required"):
        manager.create(JobRequest(Selection()))
    with pytest.raises(InvalidArgument) as bad_name:
        manager.create(JobRequest(Selection(("images/" + "a" * 64, "images/nope"))))
    assert bad_name.value.violations[0].field == "selection.images.names[1]"
    with pytest.raises(InvalidArgument, match="at most 100,000"):
        manager.create(JobRequest(Selection(("images/" + "a" * 64,) * 100_001)))
    with pytest.raises(InvalidArgument, match="top_k"):
        manager.create(JobRequest(Selection(("images/" + "a" * 64,)), top_k=-1))
    assert list(store.list_keys("jobs/")) == []
    with pytest.raises(NotFound, match="does not exist"):
        manager.get("0000000000000-none")
    # The manager still works after each bad request.
    names = _put_indexed(store, search, 1)
    assert (
        _wait_final(manager, manager.create(JobRequest(Selection(tuple(names)))).job_id).state
        is JobState.SUCCEEDED
    )


def test_duplicate_names_are_classified_once(manager, store, search):
    names = _put_indexed(store, search, 3)
    created = manager.create(JobRequest(Selection((*names, names[0]))))
    assert created.total_count == 3
    assert _wait_final(manager, created.job_id).processed_count == 3
