"""The job resource as plain data: its state machine, stored form and rate."""

from __future__ import annotations

import pytest

from imagemesh.errors import FailedPrecondition
from inference_service.batch.jobs import (
    ItemFailure,
    JobMode,
    JobRecord,
    JobState,
    RateMeter,
    Selection,
    new_job_id,
)


def _record(**changes):
    base = JobRecord(
        job_id=new_job_id(),
        state=JobState.PENDING,
        selection=Selection(names=("images/" + "a" * 64,)),
        model_version="models/m/versions/v",
        requested_mode=JobMode.AUTO,
    )
    from dataclasses import replace

    return replace(base, **changes)


def test_final_states_cannot_be_left():
    done = _record().transition(JobState.RUNNING).transition(JobState.SUCCEEDED)
    assert done.final
    assert done.end_time is not None
    for state in (JobState.RUNNING, JobState.CANCELLING, JobState.FAILED):
        with pytest.raises(FailedPrecondition):
            done.transition(state)


def test_cancelling_leads_only_to_cancelled_or_failed():
    cancelling = _record().transition(JobState.RUNNING).transition(JobState.CANCELLING)
    with pytest.raises(FailedPrecondition):
        cancelling.transition(JobState.SUCCEEDED)
    assert cancelling.transition(JobState.CANCELLED).state is JobState.CANCELLED


def test_counts_never_go_backwards():
    record = _record().with_progress(10, 2, (), 5.0, 1.0)
    older = record.with_progress(7, 1, (), 5.0, 1.0)
    assert (older.processed_count, older.failed_count) == (10, 2)


def test_the_stored_form_round_trips_every_field():
    record = _record(
        state=JobState.RUNNING,
        mode=JobMode.SPARK,
        selection=Selection(filter={"datasets": ["flowers"]}),
        failures=(ItemFailure("images/x", "NOT_FOUND", "IMAGE_NOT_FOUND", "gone"),),
        owner={"host": "h", "pid": 1, "instance": "i"},
        eta_s=3.5,
    )
    assert JobRecord.from_json(record.to_json()) == record


def test_a_document_that_is_not_a_record_is_refused():
    with pytest.raises(ValueError, match="not a batch job record"):
        JobRecord.from_json(b'{"hello": 1}')


def test_job_ids_sort_by_creation_time():
    assert new_job_id(1000.0) < new_job_id(1000.5) < new_job_id(2000.0)


def test_rate_and_eta_follow_the_recent_window():
    meter = RateMeter(window_s=10)
    assert meter.eta_s(100) is None
    meter.add(0, now=0.0)
    meter.add(50, now=5.0)
    assert meter.rate() == pytest.approx(10.0)
    assert meter.eta_s(100) == pytest.approx(10.0)
    meter.add(250, now=20.0)  # the window slides: the old samples drop out
    assert meter.rate() == pytest.approx(200 / 15)
