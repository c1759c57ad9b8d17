"""The standalone Spark cluster runs one job's tasks on two different workers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.engines import SparkCluster, http_json

PARTITIONS = 8


@pytest.fixture
def spark_session(spark_master: SparkCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    # The driver passes only PYSPARK_PYTHON to the workers as their Python: make it ours.
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master(spark_master.master_url)
        .appName("imagemesh-engines-test")
        # One single-core executor per worker, and no task before both have registered, so the
        # first executor up cannot take every task.
        .config("spark.executor.cores", "1")
        .config("spark.cores.max", str(spark_master.workers))
        .config("spark.executor.memory", "512m")
        .config("spark.scheduler.minRegisteredResourcesRatio", "1.0")
        .config("spark.scheduler.maxRegisteredResourcesWaitingTime", "120s")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    try:
        yield session
    finally:
        session.stop()


def test_job_tasks_run_on_two_distinct_workers(
    spark_master: SparkCluster, spark_session: Any
) -> None:
    master = http_json(f"{spark_master.ui_url}/json/")
    alive = [w for w in master["workers"] if w["state"] == "ALIVE"]
    assert master["status"] == "ALIVE"
    assert len({w["id"] for w in alive}) >= 2

    # Defined here, not at module level: cloudpickle ships a nested function by value, while a
    # module-level one is shipped by reference to a test module the workers cannot import.
    def _where_am_i(partition: Iterator[int]) -> Iterator[tuple[int, str]]:
        # Runs in a Python worker on an executor. A standalone worker starts each executor in
        # <worker work dir>/<app id>/<executor id>, and the Python worker inherits that folder.
        import time

        from pyspark import TaskContext

        time.sleep(0.5)  # long enough that one executor cannot drain the queue alone
        task = TaskContext.get()
        assert task is not None
        yield task.partitionId(), os.getcwd()

    context = spark_session.sparkContext
    app_id = context.applicationId
    placements = (
        context.parallelize(range(PARTITIONS), PARTITIONS).mapPartitions(_where_am_i).collect()
    )
    assert sorted(p for p, _ in placements) == list(range(PARTITIONS))
    executor_dirs = {Path(cwd) for _, cwd in placements}
    assert all(d.parent.name == app_id for d in executor_dirs)
    executors_used = {d.name for d in executor_dirs}
    assert len(executors_used) >= 2, f"all tasks ran on executor(s) {executors_used}"

    # Each worker's own API names the executors it launched for this application.
    worker_of_executor: dict[str, str] = {}
    for worker in alive:
        state = http_json(f"{worker['webuiaddress']}/json/")
        for executor in state["executors"]:
            if executor["appid"] == app_id:
                worker_of_executor[str(executor["id"])] = worker["id"]
    workers_used = {worker_of_executor[e] for e in executors_used}
    assert len(workers_used) >= 2, f"tasks ran on worker(s) {workers_used}"


def test_dataframe_aggregation_is_computed_by_the_cluster(spark_session: Any) -> None:
    from pyspark.sql import functions as F

    frame = spark_session.range(0, 10_000, numPartitions=4).withColumn("bucket", F.col("id") % 3)
    counts = {row["bucket"]: row["count"] for row in frame.groupBy("bucket").count().collect()}
    assert counts == {0: 3334, 1: 3333, 2: 3333}
