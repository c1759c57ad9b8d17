"""InferenceService over real gRPC, with models published to a local-folder object store."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from imagemesh.config import Settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import build_mesh
from inference_service.model.artifact import ModelMetadata
from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.inference_service.checks import (
    Reference,
    check_concurrent_calls_get_their_own_answer,
    check_matches_in_process,
    check_switch_under_load,
    pixels_of,
)
from tests.inference_service.fixtures import (
    TinyModels,
    local_settings,
    png,
    publish,
    reference,
    start_alone,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

V1 = "20260101-000000-aaaaaa"
V2 = "20260102-000000-bbbbbb"


@dataclass
class Served:
    """The module's server: its channel, settings, registry and the published versions."""

    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceServiceStub
    settings: Settings
    registry: ModelRegistry
    v1: ModelMetadata
    v2: ModelMetadata
    references: dict[str, Reference]


# Served alone, Classify and ClassifyStream are served by the synchronous front
# (`imagemesh.front`); in the one-process mesh, or with the front off, by grpc.aio. Every test
# here runs on both: the contract is the same.
@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["blocking front", "grpc.aio"])
async def served(
    request: pytest.FixtureRequest,
    tiny_models: TinyModels,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Served]:
    settings = local_settings(tmp_path_factory.mktemp("inference"))
    settings.inference.max_image_pixels = 1_000_000
    settings.server.blocking_front = request.param == "blocking front"
    registry = ModelRegistry(open_object_store(settings.storage))
    v1 = publish(registry, tiny_models.first, version=V1)
    v2 = publish(registry, tiny_models.second, version=V2)
    server, port = build_mesh(settings, ("inference",), port=0)
    assert (server.front is not None) == settings.server.blocking_front
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Served(
                channel,
                inference_pb2_grpc.InferenceServiceStub(channel),
                settings,
                registry,
                v1,
                v2,
                {v1.name: reference(tiny_models.first), v2.name: reference(tiny_models.second)},
            )
    finally:
        await server.stop(grace=0)


async def _code(call: object) -> tuple[grpc.StatusCode, str, grpc.aio.AioRpcError]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code(), info.value.details() or "", info.value


def _reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def _good_call_works(served: Served) -> None:
    reply = await served.stub.Classify(inference_pb2.ClassifyRequest(content=png(7)))
    assert reply.top_classes


async def test_serves_the_newest_version_at_start(served: Served) -> None:
    reply = await served.stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
    assert reply.model_version == served.v2.name
    assert reply.top_classes[0].class_name in {"cat", "dog", "bird"}
    assert len(reply.top_classes) == 3  # default top_k 5, capped at the class count


async def test_probabilities_equal_the_in_process_call(served: Served) -> None:
    await check_matches_in_process(served.channel, served.references, range(5))


async def test_64_concurrent_calls_each_get_their_own_answer(served: Served) -> None:
    replies = await check_concurrent_calls_get_their_own_answer(served.channel, served.references)
    # max_batch_size is 8 here: never exceeded.
    assert max(r.batch_size for r in replies) <= 8


async def test_npy_and_other_formats_classify_like_the_png(served: Served) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    expected = served.references[served.v2.name](pixels.astype(np.float32))
    encodings: dict[str, bytes] = {}
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    encodings["npy-uint8"] = buffer.getvalue()
    buffer = io.BytesIO()
    np.save(buffer, pixels.astype(np.float32) / 255.0)
    encodings["npy-float"] = buffer.getvalue()
    for fmt in ("PNG", "BMP", "TIFF"):  # lossless: the same pixels
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        encodings[fmt] = buffer.getvalue()
    for name, content in encodings.items():
        reply = await served.stub.Classify(
            inference_pb2.ClassifyRequest(content=content, include_probabilities=True)
        )
        np.testing.assert_allclose(reply.probabilities, expected, atol=1e-4, err_msg=name)
    for fmt in ("JPEG", "WEBP"):  # lossy: decodable, a valid distribution
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        reply = await served.stub.Classify(
            inference_pb2.ClassifyRequest(content=buffer.getvalue(), include_probabilities=True)
        )
        assert sum(reply.probabilities) == pytest.approx(1.0, abs=1e-4), fmt


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


def _big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (1100, 1000)).save(buffer, format="PNG")  # 1.1 MP > the 1 MP limit here
    return buffer.getvalue()


BAD_REQUESTS = {
    "no image": (inference_pb2.ClassifyRequest(), "INVALID_ARGUMENT", "MISSING_IMAGE"),
    "empty bytes": (inference_pb2.ClassifyRequest(content=b""), "INVALID_ARGUMENT", "EMPTY_IMAGE"),
    "not an image": (
        inference_pb2.ClassifyRequest(content=b"hello, not an image"),
        "INVALID_ARGUMENT",
        "UNDECODABLE_IMAGE",
    ),
    "truncated png": (
        inference_pb2.ClassifyRequest(content=png(3)[:60]),
        "INVALID_ARGUMENT",
        "UNDECODABLE_IMAGE",
    ),
    "gif": (
        inference_pb2.ClassifyRequest(content=_gif()),
        "INVALID_ARGUMENT",
        "UNSUPPORTED_IMAGE_FORMAT",
    ),
    "too many pixels": (
        inference_pb2.ClassifyRequest(content=_big_png()),
        "INVALID_ARGUMENT",
        "IMAGE_TOO_MANY_PIXELS",
    ),
    "top_k over the classes": (
        inference_pb2.ClassifyRequest(content=png(1), top_k=4),
        "INVALID_ARGUMENT",
        "INVALID_TOP_K",
    ),
    "persist without a stored image": (
        inference_pb2.ClassifyRequest(content=png(1), persist=True),
        "INVALID_ARGUMENT",
        "PERSIST_NEEDS_STORED_IMAGE",
    ),
    "malformed image name": (
        inference_pb2.ClassifyRequest(image_name="images/not-a-hash"),
        "INVALID_ARGUMENT",
        "INVALID_IMAGE_NAME",
    ),
    "malformed model version": (
        inference_pb2.ClassifyRequest(content=png(1), model_version="default"),
        "INVALID_ARGUMENT",
        "INVALID_MODEL_VERSION_NAME",
    ),
    "unknown model version": (
        inference_pb2.ClassifyRequest(content=png(1), model_version="models/default/versions/nope"),
        "NOT_FOUND",
        "MODEL_VERSION_NOT_FOUND",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_a_clear_status_and_the_service_goes_on(
    served: Served, case: str
) -> None:
    request, code, reason = BAD_REQUESTS[case]
    got, message, error = await _code(served.stub.Classify(request))
    assert got.name == code, message
    assert _reason(error) == reason
    assert len(message) > 20  # a sentence, not a bare code
    await _good_call_works(served)


async def test_an_expired_deadline_is_deadline_exceeded(served: Served) -> None:
    code, _, _ = await _code(
        served.stub.Classify(inference_pb2.ClassifyRequest(content=png(1)), timeout=0.000_1)
    )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    await _good_call_works(served)


async def test_classify_stream_answers_every_request_id_once(served: Served) -> None:
    contents = {f"id-{i}": png(3000 + i) for i in range(20)}
    requests = [
        inference_pb2.ClassifyStreamRequest(
            request_id=rid,
            request=inference_pb2.ClassifyRequest(content=c, include_probabilities=True),
        )
        for rid, c in contents.items()
    ]
    requests.insert(
        5,
        inference_pb2.ClassifyStreamRequest(
            request_id="bad", request=inference_pb2.ClassifyRequest(content=b"")
        ),
    )
    replies = [r async for r in served.stub.ClassifyStream(iter(requests))]
    by_id = {r.request_id: r for r in replies}
    assert len(replies) == len(by_id) == 21
    assert by_id["bad"].error.code == "INVALID_ARGUMENT"
    assert by_id["bad"].error.reason == "EMPTY_IMAGE"
    assert not by_id["bad"].HasField("response")
    for rid, content in contents.items():
        response = by_id[rid].response
        expected = served.references[response.model_version](pixels_of(content))
        np.testing.assert_allclose(response.probabilities, expected, atol=1e-5)


async def test_an_empty_stream_ends_cleanly(served: Served) -> None:
    assert [r async for r in served.stub.ClassifyStream(iter([]))] == []


async def test_list_model_versions_pages_newest_first(served: Served) -> None:
    first = await served.stub.ListModelVersions(
        inference_pb2.ListModelVersionsRequest(model="models/default", page_size=1)
    )
    assert [v.name for v in first.model_versions] == [served.v2.name]
    assert first.next_page_token
    second = await served.stub.ListModelVersions(
        inference_pb2.ListModelVersionsRequest(
            model="models/default", page_size=1, page_token=first.next_page_token
        )
    )
    assert [v.name for v in second.model_versions] == [served.v1.name]
    assert second.next_page_token == ""
    version = first.model_versions[0]
    assert list(version.class_names) == ["cat", "dog", "bird"]
    assert (version.input_height, version.input_width) == (32, 32)
    assert version.backbone_weights == "none"
    assert version.preprocessing == "densenet"
    assert version.metrics["val_accuracy"] == pytest.approx(0.25)
    everything = await served.stub.ListModelVersions(inference_pb2.ListModelVersionsRequest())
    serving = [v.name for v in everything.model_versions if v.serving]
    assert len(serving) == 1


@pytest.mark.parametrize(
    "request_",
    [
        inference_pb2.ListModelVersionsRequest(model="default"),
        inference_pb2.ListModelVersionsRequest(page_size=501),
        inference_pb2.ListModelVersionsRequest(page_token="forged"),
    ],
)
async def test_list_model_versions_rejects_bad_arguments(
    served: Served, request_: inference_pb2.ListModelVersionsRequest
) -> None:
    code, _, _ = await _code(served.stub.ListModelVersions(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


async def test_select_an_unknown_or_malformed_version(served: Served) -> None:
    code, message, _ = await _code(
        served.stub.SelectModelVersion(
            inference_pb2.SelectModelVersionRequest(name="models/default/versions/nope")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND, message
    code, _, _ = await _code(
        served.stub.SelectModelVersion(inference_pb2.SelectModelVersionRequest(name="nope"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await _good_call_works(served)


async def test_an_unloadable_version_is_refused_and_the_previous_keeps_serving(
    served: Served,
) -> None:
    before = await served.stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
    broken = served.v1.prefix.replace(V1, "20260103-000000-cccccc")
    store = open_object_store(served.settings.storage)
    store.put_bytes(broken + "model.keras", b"this is not a keras file")
    store.put_bytes(
        broken + "metadata.json",
        served.v1.to_json().replace(V1.encode(), b"20260103-000000-cccccc"),
    )
    code, message, _ = await _code(
        served.stub.SelectModelVersion(
            inference_pb2.SelectModelVersionRequest(
                name="models/default/versions/20260103-000000-cccccc"
            )
        )
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot be loaded" in message
    after = await served.stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
    assert after.model_version == before.model_version
    store.delete(broken + "metadata.json")
    store.delete(broken + "model.keras")


async def test_model_switch_under_load_fails_no_call(served: Served) -> None:
    answers = await check_switch_under_load(
        served.channel, served.references, [served.v1.name, served.v2.name]
    )
    assert set(answers) == {served.v1.name, served.v2.name}
    # The previous version stays loaded: a call may pin it.
    reply = await served.stub.Classify(
        inference_pb2.ClassifyRequest(content=png(1), model_version=served.v1.name)
    )
    assert reply.model_version == served.v1.name


async def test_a_published_but_unloaded_version_must_be_selected_first(
    served: Served, tiny_models: TinyModels
) -> None:
    v3 = publish(served.registry, tiny_models.first, version="20260104-000000-dddddd")
    code, message, _ = await _code(
        served.stub.Classify(inference_pb2.ClassifyRequest(content=png(1), model_version=v3.name))
    )
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "select" in message
    store = open_object_store(served.settings.storage)
    store.delete(v3.prefix + "metadata.json")
    store.delete(v3.prefix + "model.keras")


async def test_without_a_model_classify_says_how_to_publish_one(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    server, address = await start_alone(settings)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            code, message, _ = await _code(
                stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
            )
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "imagemesh models publish-random" in message
            code, _, _ = await _code(_drain(stub.ClassifyStream(iter([]))))
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            listing = await stub.ListModelVersions(inference_pb2.ListModelVersionsRequest())
            assert list(listing.model_versions) == []
            # Publishing then selecting makes it serve, without a restart.
            registry = ModelRegistry(open_object_store(settings.storage))
            version = publish(registry, tiny_models.first)
            selected = await stub.SelectModelVersion(
                inference_pb2.SelectModelVersionRequest(name=version.name)
            )
            assert selected.previous_model_version == ""
            reply = await stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
            assert reply.model_version == version.name
    finally:
        await server.stop(grace=0)


async def _drain(call: object) -> list[object]:
    return [r async for r in call]  # type: ignore[attr-defined]


async def test_a_full_queue_answers_resource_exhausted_with_retry_info(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    settings.inference.queue_capacity = 2
    publish(ModelRegistry(open_object_store(settings.storage)), tiny_models.first)
    server, address = await start_alone(settings)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            results = await asyncio.gather(
                *(stub.Classify(inference_pb2.ClassifyRequest(content=png(i))) for i in range(150)),
                return_exceptions=True,
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            assert errors, "150 concurrent calls never filled a queue of 2"
            assert len(errors) < len(results)
            for error in errors:
                assert isinstance(error, grpc.aio.AioRpcError)
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(errors[0])  # type: ignore[arg-type]
            assert status is not None
            assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in status.details)
            await stub.Classify(inference_pb2.ClassifyRequest(content=png(1)))
    finally:
        await server.stop(grace=0)
