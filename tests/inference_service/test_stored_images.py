"""Classifying stored images through the whole mesh: read from StorageService, and `persist`
writing the probabilities as `.npy` (StorageService.PutArray) and the prediction to search."""

from __future__ import annotations

import asyncio
import hashlib
import io
from pathlib import Path

import grpc
import numpy as np
import pytest

from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.inference_service.fixtures import TinyModels, local_settings, png, publish


async def _upload(channel: grpc.aio.Channel, content: bytes) -> str:
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    messages = [
        storage_pb2.UploadImageRequest(
            header=storage_pb2.UploadImageHeader(filename="x.png", dataset="demo")
        ),
        storage_pb2.UploadImageRequest(chunk=content),
    ]
    reply = await stub.UploadImage(iter(messages))
    return reply.image.name


async def _document(channel: grpc.aio.Channel, name: str) -> search_pb2.ImageDocument:
    stub = search_pb2_grpc.SearchServiceStub(channel)
    for _ in range(100):  # storage reports uploads to search asynchronously (its outbox)
        try:
            return (
                await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=name))
            ).document
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} never reached the search index")


async def test_stored_image_is_classified_and_persisted_as_npy_and_in_search(
    tmp_path: Path, started, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    version = publish(ModelRegistry(open_object_store(settings.storage)), tiny_models.first)
    address = await started(settings, ("storage", "search", "inference"))
    async with grpc.aio.insecure_channel(address) as channel:
        content = png(42)
        name = await _upload(channel, content)
        assert name == "images/" + hashlib.sha256(content).hexdigest()
        await _document(channel, name)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        by_bytes = await stub.Classify(
            inference_pb2.ClassifyRequest(content=content, include_probabilities=True)
        )
        reply = await stub.Classify(
            inference_pb2.ClassifyRequest(image_name=name, include_probabilities=True, persist=True)
        )
        assert reply.model_version == version.name
        np.testing.assert_allclose(reply.probabilities, by_bytes.probabilities, atol=1e-6)
        sha = name.removeprefix("images/")
        expected_array = f"arrays/predictions/default/{version.version}/{sha}.npy"
        assert reply.probabilities_array == expected_array

        stored = await storage_pb2_grpc.StorageServiceStub(channel).GetArray(
            storage_pb2.GetArrayRequest(name=expected_array)
        )
        array = np.load(io.BytesIO(stored.npy_content))
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, reply.probabilities, atol=0)

        document = await _document(channel, name)
        predictions = [p for p in document.predictions if p.model_version == version.name]
        assert len(predictions) == 1
        prediction = predictions[0]
        assert prediction.top_class == reply.top_classes[0].class_name
        assert prediction.confidence == pytest.approx(reply.top_classes[0].probability)
        assert prediction.probabilities_array == expected_array


async def test_unknown_stored_image_is_not_found_and_the_service_goes_on(
    tmp_path: Path, started, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    publish(ModelRegistry(open_object_store(settings.storage)), tiny_models.first)
    address = await started(settings, ("storage", "search", "inference"))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Classify(
                inference_pb2.ClassifyRequest(image_name="images/" + "0" * 64, persist=True)
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "images/" + "0" * 64 in (info.value.details() or "")
        reply = await stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
        assert reply.top_classes
