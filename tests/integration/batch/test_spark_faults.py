"""Batch jobs on the real standalone Spark cluster (a master and two one-core workers), reading
images from and writing predictions to real MinIO, under faults: a worker killed mid-job, a
cancel mid-job, the master down when a job starts (a private standalone master for that one:
killing the shared master would break other sessions' Spark tests running at the same time).

Predictions are indexed into a real SearchService on Elasticsearch (`served_search`), and
read back through it: a retried task re-indexes its images, and the index must still hold one
prediction per image and version.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from minio.deleteobjects import DeleteObject

from imagemesh.config import S3Settings, SparkSettings, StorageBackend, StorageSettings
from imagemesh.ports import free_loopback_port
from imagemesh.spark.app import SparkApp
from inference_service.batch.jobs import JobMode, JobState, Selection
from inference_service.batch.keys import image_object_key, prediction_array_name
from inference_service.batch.local_runner import LocalRunner
from inference_service.batch.manager import BatchJobManager, BatchOptions, JobRequest
from inference_service.batch.selection import GrpcSelectionResolver
from inference_service.batch.spark_runner import SparkRunner
from inference_service.batch.store import JobStore
from storage_service.backends import open_object_store
from tests.fixtures.engines import ENGINES_SH, S3Engine, SparkCluster, engine_state_dir
from tests.fixtures.served_search import ThreadedSearch
from tests.inference_service.batch.helpers import png_bytes

IMAGES = 2000
PARTITION_IMAGES = 100


@pytest.fixture(scope="module")
def bucket_settings(minio_engine: S3Engine, model_root: Path) -> Iterator[StorageSettings]:
    """A MinIO bucket for the module holding 2,000 generated images and the tiny model."""
    client = minio_engine.client()
    name = f"test-batch-{uuid.uuid4().hex[:12]}"
    client.make_bucket(name)
    settings = StorageSettings(
        backend=StorageBackend.S3,
        s3=S3Settings(
            endpoint=minio_engine.host,
            access_key=minio_engine.access_key,
            secret_key=minio_engine.secret_key,
            bucket=name,
        ),
    )
    store = open_object_store(settings)

    def put(index: int) -> None:
        data = png_bytes(index)
        store.put_bytes(image_object_key(hashlib.sha256(data).hexdigest()), data, "image/png")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(IMAGES)))
    for path in (model_root / "models").rglob("*"):
        if path.is_file():
            store.put_bytes(str(path.relative_to(model_root)), path.read_bytes())
    yield settings
    keys = (o.object_name for o in client.list_objects(name, recursive=True))
    errors = list(client.remove_objects(name, (DeleteObject(k) for k in keys if k)))
    assert not errors
    client.remove_bucket(name)


def _image_names() -> list[str]:
    return [f"images/{hashlib.sha256(png_bytes(i)).hexdigest()}" for i in range(IMAGES)]


@pytest.fixture(scope="module")
def names(served_search: ThreadedSearch) -> list[str]:
    """The images' names, each with its document in the search service."""
    image_names = _image_names()
    served_search.index_images(image_names, dataset="faults")
    return image_names


def _publish_as(store, version: str) -> str:
    """The tiny model again under another version, so each test owns its prediction keys."""
    source = "models/default/versions/tiny-1/"
    target = f"models/default/versions/{version}/"
    store.put_bytes(target + "model.keras", store.get_bytes(source + "model.keras"))
    metadata = json.loads(store.get_bytes(source + "metadata.json"))
    metadata["version"] = version
    store.put_bytes(target + "metadata.json", json.dumps(metadata).encode())
    return f"models/default/versions/{version}"


@pytest.fixture(scope="module")
def cluster_app(spark_engine: SparkCluster) -> Iterator[SparkApp]:
    """One warm application on the standalone cluster for the module, as the service keeps."""
    app = SparkApp(SparkSettings(master=spark_engine.master_url, executor_memory="1g"))
    app.warm()
    yield app
    app.stop()


def _manager(app, settings, search: ThreadedSearch) -> BatchJobManager:
    manager = BatchJobManager(
        jobs=JobStore(open_object_store(settings)),
        options=BatchOptions(
            storage=settings,
            search_address=search.address,
            batch_size=32,
            io_threads=8,
            heartbeat_s=0.5,
        ),
        resolver=GrpcSelectionResolver("127.0.0.1:1", search.address),
        local_runner=LocalRunner(),
        spark_runner=SparkRunner(app, partition_images=PARTITION_IMAGES),
        resolve_model=lambda name: name,
    )
    manager.start()
    return manager


def _wait(manager, job_id, predicate, timeout_s=600.0, step_s=0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        record = manager.get(job_id)
        if predicate(record):
            return record
        time.sleep(step_s)
    raise AssertionError(f"timed out; job is {manager.get(job_id)}")


def _wait_executors(app: SparkApp, count: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while app.executor_count() < count:
        assert time.monotonic() < deadline, f"only {app.executor_count()} executor(s) registered"
        time.sleep(0.5)


def _pid(pidfile: Path) -> int:
    return int(pidfile.read_text().split()[0])


def _wait_port_closed(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Returns once nothing accepts connections on `port` (a killed process is really gone)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                pass
        except OSError:
            return
        time.sleep(0.1)
    raise AssertionError(f"{host}:{port} still accepts connections")


def _engines_up() -> None:
    result = subprocess.run(
        [str(ENGINES_SH), "up"],
        env={**os.environ, "ENGINES": "spark"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_killing_one_of_two_workers_mid_job_still_classifies_every_image_exactly_once(
    cluster_app, bucket_settings, names, served_search
):
    _wait_executors(cluster_app, 2)
    store = open_object_store(bucket_settings)
    version = _publish_as(store, "kill")
    manager = _manager(cluster_app, bucket_settings, served_search)
    worker_pidfile = engine_state_dir("spark") / "run" / "worker-1.pid"
    try:
        created = manager.create(
            JobRequest(Selection(tuple(names)), model_version=version, mode=JobMode.SPARK)
        )
        _wait(manager, created.job_id, lambda r: r.processed_count >= IMAGES * 0.4 or r.final)
        assert not manager.get(created.job_id).final, "the job ended before the fault"
        # The worker, its executor JVM and that executor's Python workers share a process group.
        os.killpg(_pid(worker_pidfile), signal.SIGKILL)
        done = _wait(manager, created.job_id, lambda r: r.final)
    finally:
        manager.stop()
        _engines_up()  # restart the killed worker for the next tests

    assert done.state is JobState.SUCCEEDED, done.error_message
    assert (done.processed_count, done.failed_count, done.total_count) == (IMAGES, 0, IMAGES)
    prefix = prediction_array_name(version, "x").rsplit("/", 1)[0] + "/"
    keys = list(store.list_keys(prefix))
    assert len(keys) == IMAGES
    assert {k.rsplit("/", 1)[1].removesuffix(".npy") for k in keys} == {n[7:] for n in names}
    # Read back from Elasticsearch: every image once, each with exactly one prediction of
    # this version, although the killed executor's tasks ran (and indexed) again.
    predicted = served_search.predictions_by(version)
    assert sorted(predicted) == sorted(names)
    for name, mine in predicted.items():
        assert len(mine) == 1, (name, mine)
        assert mine[0].probabilities_array == prediction_array_name(version, name[7:])


def test_cancel_mid_job_stops_the_spark_job_and_the_counts_say_what_was_done(
    cluster_app, bucket_settings, names, served_search
):
    _wait_executors(cluster_app, 2)
    store = open_object_store(bucket_settings)
    version = _publish_as(store, "cancel")
    manager = _manager(cluster_app, bucket_settings, served_search)
    try:
        created = manager.create(
            JobRequest(Selection(tuple(names)), model_version=version, mode=JobMode.SPARK)
        )
        _wait(manager, created.job_id, lambda r: r.processed_count > 0 or r.final)
        cancelling = manager.cancel(created.job_id)
        assert cancelling.state is JobState.CANCELLING
        done = _wait(manager, created.job_id, lambda r: r.final)
    finally:
        manager.stop()

    assert done.state is JobState.CANCELLED
    assert 0 < done.processed_count < IMAGES
    assert done.failed_count == 0
    tracker = cluster_app.context().statusTracker()
    group_jobs = tracker.getJobIdsForGroup(done.spark_job_group)
    assert group_jobs, "the job ran under its own job group"
    for job in group_jobs:
        assert tracker.getJobInfo(job).status != "RUNNING"
    prefix = prediction_array_name(version, "x").rsplit("/", 1)[0] + "/"
    written = len(list(store.list_keys(prefix)))
    # Counted images are stored; interrupted tasks may have stored a few more (not counted,
    # since not indexed as a whole), and nothing is written any more after the cancel.
    assert written >= done.processed_count
    time.sleep(3)
    assert len(list(store.list_keys(prefix))) == written < IMAGES
    # Every counted image is searchable with its prediction (a task's last batch waits until
    # visible); none was indexed without its array.
    assert done.processed_count <= len(served_search.predictions_by(version)) <= written
    assert JobStore(store).get(created.job_id).state is JobState.CANCELLED


@pytest.fixture
def private_master(spark_engine: SparkCluster) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A standalone master of our own (the same Spark as the shared cluster's, started the way
    engines.sh starts it), so that killing it cannot disturb other users of the shared one."""
    import pyspark

    port = free_loopback_port()
    home = Path(pyspark.__file__).parent
    process = subprocess.Popen(
        [
            str(home / "bin" / "spark-class"),
            "org.apache.spark.deploy.master.Master",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--webui-port",
            str(free_loopback_port()),
        ],
        env={**os.environ, "SPARK_HOME": str(home), "SPARK_LOCAL_IP": "127.0.0.1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "the private master did not start"
            time.sleep(0.2)
    yield f"spark://127.0.0.1:{port}", process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_a_job_started_while_the_master_is_down_fails_at_once_with_the_reason(
    private_master, bucket_settings, names, served_search
):
    master_url, master = private_master
    store = open_object_store(bucket_settings)
    version = _publish_as(store, "down")
    app = SparkApp(SparkSettings(master=master_url, executor_memory="1g"))
    app.check_master()  # it is up: what follows is the kill's doing
    manager = _manager(app, bucket_settings, served_search)
    try:
        os.killpg(master.pid, signal.SIGKILL)
        master.wait()
        _wait_port_closed("127.0.0.1", int(master_url.rsplit(":", 1)[1]))
        created = manager.create(
            JobRequest(Selection(tuple(names[:50])), model_version=version, mode=JobMode.SPARK)
        )
        done = _wait(manager, created.job_id, lambda r: r.final, timeout_s=60)
    finally:
        manager.stop()
        app.stop()

    assert done.state is JobState.FAILED
    assert f"{master_url} cannot be reached" in done.error_message
    assert "nothing was written" in done.error_message
    # Failed by the master check, not after Spark's minute of registration retries.
    assert "All masters are unresponsive" not in done.error_message
    prefix = prediction_array_name(version, "x").rsplit("/", 1)[0] + "/"
    assert list(store.list_keys(prefix)) == []
    assert JobStore(store).get(created.job_id).state is JobState.FAILED
