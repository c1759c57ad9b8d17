"""The Spark runner on the embedded default, `local[2]`: the same job API as on a cluster.

Real Spark (an application in this process's JVM, Python workers forked by Spark), a real
local object store, and the real SearchService (SQLite) that the workers index into.
"""

from __future__ import annotations

import time

import pytest

from imagemesh.config import SparkSettings
from imagemesh.spark.app import SparkApp
from inference_service.batch.jobs import JobMode, JobState, Selection
from inference_service.batch.keys import prediction_array_name
from inference_service.batch.local_runner import LocalRunner
from inference_service.batch.manager import BatchJobManager, BatchOptions, JobRequest
from inference_service.batch.selection import GrpcSelectionResolver
from inference_service.batch.spark_runner import SparkRunner, partition_count
from inference_service.batch.store import JobStore
from tests.inference_service.batch.helpers import MODEL_VERSION, put_garbage, put_images


@pytest.fixture(scope="module")
def spark_app():
    app = SparkApp(SparkSettings(master="local[2]", executor_memory="1g"))
    yield app
    app.stop()


def _wait_final(manager, job_id, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = manager.get(job_id)
        if record.final:
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {manager.get(job_id)}")


def test_partitions_are_small_but_at_least_one_per_slot():
    assert partition_count(2000, 256, 2) == 8
    assert partition_count(10, 256, 2) == 2
    assert partition_count(1, 256, 2) == 1
    assert partition_count(0, 256, 2) == 1


def test_a_spark_job_classifies_every_image_once_and_reports_per_image_failures(
    spark_app, store, storage_settings, search
):
    names = put_images(store, 60)
    garbage = put_garbage(store)
    search.index_images([*names, garbage])
    manager = BatchJobManager(
        jobs=JobStore(store),
        options=BatchOptions(
            storage=storage_settings,
            search_address=search.address,
            batch_size=8,
            io_threads=4,
            heartbeat_s=0.5,
        ),
        resolver=GrpcSelectionResolver("127.0.0.1:1", search.address),
        local_runner=LocalRunner(),
        spark_runner=SparkRunner(spark_app, partition_images=16),
        resolve_model=lambda name: name or MODEL_VERSION,
    )
    manager.start()
    try:
        created = manager.create(
            JobRequest(Selection((*names[:30], garbage, *names[30:])), mode=JobMode.SPARK)
        )
        done = _wait_final(manager, created.job_id)
    finally:
        manager.stop()

    assert done.state is JobState.SUCCEEDED, done.error_message
    assert done.mode is JobMode.SPARK
    assert done.spark_job_group == f"imagemesh-batch-{created.job_id}"
    assert (done.processed_count, done.failed_count, done.total_count) == (60, 1, 61)
    assert [(f.image, f.reason) for f in done.failures] == [(garbage, "UNDECODABLE_IMAGE")]
    for name in names:
        assert store.exists(prediction_array_name(MODEL_VERSION, name[7:]))
    assert len(list(store.list_keys("arrays/predictions/"))) == 60
    indexed = search.predictions_by(MODEL_VERSION)
    assert {name: len(predictions) for name, predictions in indexed.items()} == dict.fromkeys(
        names, 1
    )
