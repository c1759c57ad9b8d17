"""The issue's correctness checks with the model artifacts stored in real MinIO."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest_asyncio

from imagemesh.config import Settings, StorageBackend
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import build_mesh
from inference_service.model.artifact import ModelMetadata
from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.fixtures.engines import S3Bucket
from tests.inference_service.checks import (
    Reference,
    check_concurrent_calls_get_their_own_answer,
    check_matches_in_process,
    check_switch_under_load,
)
from tests.inference_service.fixtures import TinyModels, local_settings, publish, reference


@dataclass
class MinioServed:
    channel: grpc.aio.Channel
    v1: ModelMetadata
    v2: ModelMetadata
    references: dict[str, Reference]


def _minio_settings(tmp_path: Path, bucket: S3Bucket) -> Settings:
    settings = local_settings(tmp_path)
    settings.storage.backend = StorageBackend.S3
    settings.storage.s3.endpoint = bucket.host
    settings.storage.s3.access_key = bucket.access_key
    settings.storage.s3.secret_key = bucket.secret_key
    settings.storage.s3.bucket = bucket.name
    return settings


@pytest_asyncio.fixture
async def minio_served(
    tmp_path: Path, minio_bucket: S3Bucket, tiny_models: TinyModels
) -> AsyncIterator[MinioServed]:
    settings = _minio_settings(tmp_path, minio_bucket)
    registry = ModelRegistry(open_object_store(settings.storage))
    v1 = publish(registry, tiny_models.first, version="20260101-000000-aaaaaa")
    v2 = publish(registry, tiny_models.second, version="20260102-000000-bbbbbb")
    # The artifacts are really in the bucket, not in a local folder.
    keys = {
        o.object_name for o in minio_bucket.client().list_objects(minio_bucket.name, recursive=True)
    }
    assert v2.prefix + "model.keras" in keys
    assert v2.prefix + "metadata.json" in keys
    server, port = build_mesh(settings, ("inference",), port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield MinioServed(
                channel,
                v1,
                v2,
                {v1.name: reference(tiny_models.first), v2.name: reference(tiny_models.second)},
            )
    finally:
        await server.stop(grace=0)


async def test_a_model_in_minio_serves_the_in_process_probabilities_to_concurrent_calls(
    minio_served: MinioServed,
) -> None:
    stub = inference_pb2_grpc.InferenceServiceStub(minio_served.channel)
    listing = await stub.ListModelVersions(inference_pb2.ListModelVersionsRequest())
    assert [v.name for v in listing.model_versions] == [minio_served.v2.name, minio_served.v1.name]
    assert [v.serving for v in listing.model_versions] == [True, False]
    await check_matches_in_process(minio_served.channel, minio_served.references, range(3))
    await check_concurrent_calls_get_their_own_answer(minio_served.channel, minio_served.references)


async def test_switching_between_versions_in_minio_under_load_fails_no_call(
    minio_served: MinioServed,
) -> None:
    answers = await check_switch_under_load(
        minio_served.channel,
        minio_served.references,
        [minio_served.v1.name, minio_served.v2.name],
    )
    assert set(answers) == {minio_served.v1.name, minio_served.v2.name}
