"""The five batch RPCs through the whole one-process mesh: real StorageService (local folder),
real SearchService (Elasticsearch), the inference service's own model, Spark `local[2]`.

Images are uploaded through StorageService and predictions found through SearchService, so
the batch workers' direct object-store access is checked against the storage service's own
layout (DeleteImage also removes the arrays a batch job wrote).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from imagemesh.config import load_settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from inference_service.batch.keys import prediction_array_name
from tests.inference_service.batch.helpers import MODEL_VERSION, copy_tree, png_bytes

pytestmark = pytest.mark.timeout(900)

DATASET = "shapes"


@pytest.fixture
async def mesh_address(tmp_path, model_root, es_index):
    root = tmp_path / "objects"
    root.mkdir()
    copy_tree(model_root, root)
    settings = load_settings(
        storage={"local_root": root},
        search={
            "backend": "elasticsearch",
            "elasticsearch": {"url": es_index.url, "index_prefix": es_index.prefix},
        },
        spark={"master": "local[2]", "executor_memory": "1g", "partition_images": 8},
        inference={
            "spark_threshold": 30,
            "batch_job_batch_size": 8,
            "batch_job_heartbeat_s": 0.5,
            "intra_op_threads": 1,
        },
    )
    settings.server.access_log = False
    server, port = build_mesh(settings, port=0)
    await server.start()
    try:
        yield f"127.0.0.1:{port}", root
    finally:
        await server.stop(grace=0)


async def _upload(channel, count: int, start: int = 0) -> list[str]:
    stub = storage_pb2_grpc.StorageServiceStub(channel)

    async def requests():
        for i in range(start, start + count):
            yield storage_pb2.BulkUploadImagesRequest(
                request_id=str(i),
                header=storage_pb2.UploadImageHeader(
                    filename=f"shape-{i}.png", dataset=DATASET, content_type="image/png"
                ),
                content=png_bytes(i),
            )

    names = {}
    async for ack in stub.BulkUploadImages(requests()):
        assert ack.image.name, ack
        names[int(ack.request_id)] = ack.image.name
    return [names[i] for i in sorted(names)]


async def _finish(stub, name: str) -> inference_pb2.BatchJob:
    last = None
    async for update in stub.WatchBatchJob(inference_pb2.WatchBatchJobRequest(name=name)):
        last = update.job
    assert last is not None
    return last


async def test_a_dataset_job_runs_locally_and_its_predictions_are_searchable(mesh_address):
    address, _ = mesh_address
    async with grpc.aio.insecure_channel(address) as channel:
        names = await _upload(channel, 12)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started = await stub.BatchClassify(
            inference_pb2.BatchClassifyRequest(
                selection=inference_pb2.BatchSelection(dataset=DATASET), top_k=2
            )
        )
        assert started.job.state == inference_pb2.BATCH_JOB_STATE_PENDING
        assert started.job.model_version == MODEL_VERSION  # the serving one, resolved at start

        done = await _finish(stub, started.job.name)

        assert done.state == inference_pb2.BATCH_JOB_STATE_SUCCEEDED, done.error_message
        assert done.mode == inference_pb2.BATCH_MODE_LOCAL  # 12 <= threshold 30
        assert (done.total_count, done.processed_count, done.failed_count) == (12, 12, 0)
        search = search_pb2_grpc.SearchServiceStub(channel)
        found = await search.SearchImages(
            search_pb2.SearchImagesRequest(
                filter=search_pb2.ImageFilter(
                    prediction=search_pb2.PredictionFilter(model_version=MODEL_VERSION)
                ),
                page_size=100,
            )
        )
        assert sorted(d.name for d in found.documents) == sorted(names)
        document = next(d for d in found.documents if d.name == names[0])
        prediction = next(p for p in document.predictions if p.model_version == MODEL_VERSION)
        assert len(prediction.top_classes) == 2
        assert prediction.probabilities_array == prediction_array_name(MODEL_VERSION, names[0][7:])

        # The storage service knows the batch job's arrays: deleting the image deletes them.
        storage = storage_pb2_grpc.StorageServiceStub(channel)
        array = await storage.GetArray(
            storage_pb2.GetArrayRequest(name=prediction.probabilities_array)
        )
        assert array.array.shape == [5]
        await storage.DeleteImage(storage_pb2.DeleteImageRequest(name=names[0]))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await storage.GetArray(storage_pb2.GetArrayRequest(name=prediction.probabilities_array))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_large_selection_runs_on_spark_with_the_same_api(mesh_address):
    address, _ = mesh_address
    async with grpc.aio.insecure_channel(address) as channel:
        names = await _upload(channel, 40)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        started = await stub.BatchClassify(
            inference_pb2.BatchClassifyRequest(
                selection=inference_pb2.BatchSelection(
                    images=inference_pb2.ImageNames(names=names)
                ),
                request_id="rpc-test-1",
            )
        )
        again = await stub.BatchClassify(
            inference_pb2.BatchClassifyRequest(
                selection=inference_pb2.BatchSelection(
                    images=inference_pb2.ImageNames(names=names)
                ),
                request_id="rpc-test-1",
            )
        )
        assert again.job.name == started.job.name

        done = await _finish(stub, started.job.name)

        assert done.state == inference_pb2.BATCH_JOB_STATE_SUCCEEDED, done.error_message
        assert done.mode == inference_pb2.BATCH_MODE_SPARK  # 40 > threshold 30
        assert done.spark_job_group
        assert (done.total_count, done.processed_count) == (40, 40)
        got = await stub.GetBatchJob(inference_pb2.GetBatchJobRequest(name=started.job.name))
        assert got.job == done
        listed = await stub.ListBatchJobs(
            inference_pb2.ListBatchJobsRequest(state=inference_pb2.BATCH_JOB_STATE_SUCCEEDED)
        )
        assert started.job.name in [j.name for j in listed.jobs]
        cancelled = await stub.CancelBatchJob(
            inference_pb2.CancelBatchJobRequest(name=started.job.name)
        )
        assert cancelled.job.state == inference_pb2.BATCH_JOB_STATE_SUCCEEDED  # final: unchanged


async def test_bad_requests_get_clear_statuses_and_the_service_keeps_serving(mesh_address):
    address, _ = mesh_address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        bad = [
            (
                stub.BatchClassify(inference_pb2.BatchClassifyRequest()),
                grpc.StatusCode.INVALID_ARGUMENT,
                "selection is required",
            ),
            (
                stub.BatchClassify(
                    inference_pb2.BatchClassifyRequest(
                        selection=inference_pb2.BatchSelection(
                            images=inference_pb2.ImageNames(names=["images/xyz"])
                        )
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "64 lowercase hex",
            ),
            (
                stub.BatchClassify(
                    inference_pb2.BatchClassifyRequest(
                        selection=inference_pb2.BatchSelection(dataset="Bad Name!")
                    )
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "selection.dataset",
            ),
            (
                stub.BatchClassify(
                    inference_pb2.BatchClassifyRequest(
                        selection=inference_pb2.BatchSelection(dataset=DATASET),
                        model_version="models/default/versions/nope",
                    )
                ),
                grpc.StatusCode.NOT_FOUND,
                "not published",
            ),
            (
                stub.GetBatchJob(inference_pb2.GetBatchJobRequest(name="jobs/1")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "batchJobs/",
            ),
            (
                stub.GetBatchJob(
                    inference_pb2.GetBatchJobRequest(name="batchJobs/0000000000000-none")
                ),
                grpc.StatusCode.NOT_FOUND,
                "does not exist",
            ),
            (
                stub.ListBatchJobs(inference_pb2.ListBatchJobsRequest(page_token="forged")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "page_token",
            ),
        ]
        for call, code, text in bad:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == code
            assert text in error.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as watch_error:
            async for _ in stub.WatchBatchJob(
                inference_pb2.WatchBatchJobRequest(name="batchJobs/0000000000000-none")
            ):
                pass
        assert watch_error.value.code() == grpc.StatusCode.NOT_FOUND
        # Nothing was recorded by the bad calls, and a good call still works.
        listed = await stub.ListBatchJobs(inference_pb2.ListBatchJobsRequest())
        assert list(listed.jobs) == []
        names = await _upload(channel, 2)
        started = await stub.BatchClassify(
            inference_pb2.BatchClassifyRequest(
                selection=inference_pb2.BatchSelection(images=inference_pb2.ImageNames(names=names))
            )
        )
        done = await asyncio.wait_for(_finish(stub, started.job.name), 300)
        assert done.state == inference_pb2.BATCH_JOB_STATE_SUCCEEDED


async def _cli(*args: str) -> tuple[int, str]:
    import sys

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "imagemesh",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**__import__("os").environ, "COLUMNS": "200"},
    )
    output, _ = await process.communicate()
    return process.returncode, output.decode()


async def test_the_cli_starts_follows_lists_and_cancels_jobs(mesh_address, tmp_path):
    address, _ = mesh_address
    async with grpc.aio.insecure_channel(address) as channel:
        names = await _upload(channel, 5)
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(names) + "\n")

    code, output = await _cli(
        "batch", "start", "--images-file", str(names_file), "--mode", "local", "--address", address
    )
    assert code == 0, output
    assert "SUCCEEDED on LOCAL: 5 classified, 0 failed of 5" in output
    job = output.split("started ")[1].split()[0]

    code, output = await _cli("batch", "list", "--state", "succeeded", "--address", address)
    assert code == 0
    assert job in output
    code, output = await _cli("batch", "watch", job, "--address", address)
    assert code == 0
    assert "SUCCEEDED" in output
    code, output = await _cli("batch", "cancel", job, "--address", address)
    assert (code, output.strip()) == (0, f"{job}: SUCCEEDED")
    code, output = await _cli(
        "batch", "watch", "batchJobs/0000000000000-none", "--address", address
    )
    assert code == 1
    assert "NOT_FOUND" in output
