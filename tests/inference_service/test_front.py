"""The InferenceService served alone, through the synchronous front (`imagemesh.front`): what
the front serves itself and what it forwards to the grpc.aio server behind it must look to a
client exactly as one server would."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from imagemesh.auth import bearer_metadata
from imagemesh.config import Settings
from imagemesh.front import StreamGate
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.interceptors import REQUEST_ID_KEY
from imagemesh.mesh import build_mesh
from inference_service.model.artifact import ModelMetadata
from inference_service.model.registry import ModelRegistry
from storage_service.backends import open_object_store
from tests.inference_service.fixtures import (
    TinyModels,
    local_settings,
    png,
    publish,
    start_alone,
)
from tests.inference_service.test_stored_images import _document, _upload

SERVICE = "imagemesh.inference.v1.InferenceService"


@asynccontextmanager
async def _served_alone(
    settings: Settings, keras_model: Any
) -> AsyncIterator[tuple[grpc.aio.Channel, ModelMetadata]]:
    """Publishes `keras_model`, serves the inference service alone (through its front), and
    yields a channel to it and the published version; stops the service after."""
    version = publish(ModelRegistry(open_object_store(settings.storage)), keras_model)
    server, address = await start_alone(settings)
    assert server.front is not None, "served alone, the inference service has a front"
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield channel, version
    finally:
        await server.stop(grace=0)


async def test_the_front_and_grpc_aio_give_the_same_answers_with_a_request_id(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    async with _served_alone(settings, tiny_models.first) as (to_front, _):
        settings.server.blocking_front = False
        plain, port = build_mesh(settings, ("inference",), port=0)
        assert plain.front is None
        await plain.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as to_plain:
                request = inference_pb2.ClassifyRequest(content=png(5), include_probabilities=True)
                call = inference_pb2_grpc.InferenceServiceStub(to_front).Classify(
                    request, metadata=((REQUEST_ID_KEY, "front-1"),)
                )
                through_front = await call
                assert (REQUEST_ID_KEY, "front-1") in tuple(await call.trailing_metadata())
                direct = await inference_pb2_grpc.InferenceServiceStub(to_plain).Classify(request)
                assert through_front.model_version == direct.model_version
                np.testing.assert_allclose(
                    through_front.probabilities, direct.probabilities, atol=1e-6
                )
                assert [c.class_name for c in through_front.top_classes] == [
                    c.class_name for c in direct.top_classes
                ]
        finally:
            await plain.stop(grace=0)


async def test_forwarded_calls_keep_their_status_details_and_trailers(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    async with _served_alone(settings, tiny_models.first) as (channel, version):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        listing = await stub.ListModelVersions(inference_pb2.ListModelVersionsRequest())
        assert [v.name for v in listing.model_versions] == [version.name]
        assert listing.model_versions[0].serving

        unknown = version.name[:-6] + "ffffff"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SelectModelVersion(
                inference_pb2.SelectModelVersionRequest(name=unknown),
                metadata=((REQUEST_ID_KEY, "forwarded-1"),),
            )
        error = info.value
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert unknown in (error.details() or "")
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        assert status.details  # the rich details came through
        assert (REQUEST_ID_KEY, "forwarded-1") in tuple(error.trailing_metadata() or ())

        # Health (unary and streamed) and reflection are forwarded too.
        health = health_pb2_grpc.HealthStub(channel)
        checked = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in replies for s in r.list_services_response.service}
        assert SERVICE in names

        # A method nobody serves is UNIMPLEMENTED, as from one server.
        nothing = channel.unary_unary(f"/{SERVICE}/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await nothing(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_front_checks_the_token_and_leaves_health_open(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    settings.auth_token = "front-secret"
    async with _served_alone(settings, tiny_models.first) as (channel, _):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.ClassifyRequest(content=png(1))
        for call in (
            stub.Classify(request),
            stub.Classify(request, metadata=bearer_metadata("wrong")),
            stub.ListModelVersions(inference_pb2.ListModelVersionsRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _read_all(stub.ClassifyStream(iter([])))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = bearer_metadata("front-secret")
        assert (await stub.Classify(request, metadata=token)).top_classes
        listing = await stub.ListModelVersions(
            inference_pb2.ListModelVersionsRequest(), metadata=token
        )
        assert listing.model_versions
        checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING


async def _read_all(call: object) -> list[object]:
    return [r async for r in call]  # type: ignore[attr-defined]


async def test_stored_images_through_the_front_unary_and_streamed(
    tmp_path: Path, started, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    mesh_address = await started(settings, ("storage", "search"))
    settings.storage_address = mesh_address
    settings.search_address = mesh_address
    async with (
        _served_alone(settings, tiny_models.first) as (channel, version),
        grpc.aio.insecure_channel(mesh_address) as mesh,
    ):
        content = png(77)
        name = await _upload(mesh, content)
        await _document(mesh, name)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        by_bytes = await stub.Classify(
            inference_pb2.ClassifyRequest(content=content, include_probabilities=True)
        )
        stored = await stub.Classify(
            inference_pb2.ClassifyRequest(image_name=name, include_probabilities=True, persist=True)
        )
        assert stored.model_version == version.name
        np.testing.assert_allclose(stored.probabilities, by_bytes.probabilities, atol=1e-6)
        assert stored.probabilities_array.endswith(name.removeprefix("images/") + ".npy")

        missing = "images/" + "0" * 64
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Classify(inference_pb2.ClassifyRequest(image_name=missing))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        items = [
            ("stored", inference_pb2.ClassifyRequest(image_name=name)),
            ("sent", inference_pb2.ClassifyRequest(content=content)),
            ("missing", inference_pb2.ClassifyRequest(image_name=missing)),
            ("empty", inference_pb2.ClassifyRequest(content=b"")),
        ]
        replies = await _read_all(
            stub.ClassifyStream(
                iter(
                    inference_pb2.ClassifyStreamRequest(request_id=rid, request=request)
                    for rid, request in items
                )
            )
        )
        by_id = {r.request_id: r for r in replies}  # type: ignore[attr-defined]
        assert sorted(by_id) == sorted(rid for rid, _ in items)
        for rid in ("stored", "sent"):
            assert by_id[rid].response.top_classes[0].class_name == (
                by_bytes.top_classes[0].class_name
            )
        assert by_id["missing"].error.code == "NOT_FOUND"
        assert by_id["empty"].error.code == "INVALID_ARGUMENT"


async def test_a_stream_cancelled_midway_leaves_the_service_serving(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    async with _served_alone(settings, tiny_models.first) as (channel, _):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        call = stub.ClassifyStream()
        for i in range(40):
            await call.write(
                inference_pb2.ClassifyStreamRequest(
                    request_id=str(i), request=inference_pb2.ClassifyRequest(content=png(i))
                )
            )
        await call.read()
        call.cancel()
        # The reader thread and the queued images go away; the service goes on.
        replies = await asyncio.wait_for(
            asyncio.gather(
                *(stub.Classify(inference_pb2.ClassifyRequest(content=png(i))) for i in range(8))
            ),
            timeout=60,
        )
        assert all(r.top_classes for r in replies)


def test_an_eighth_of_the_front_s_threads_stay_for_calls_that_do_not_stream() -> None:
    assert StreamGate.for_threads(128).limit == 112
    assert StreamGate.for_threads(8).limit == 6
    assert StreamGate.for_threads(4).limit == 2  # never fewer than two kept


async def _open_stream(stub: inference_pb2_grpc.InferenceServiceStub, rid: str) -> Any:
    """A ClassifyStream with one answer read: open, holding a handler thread."""
    call = stub.ClassifyStream()
    await call.write(
        inference_pb2.ClassifyStreamRequest(
            request_id=rid, request=inference_pb2.ClassifyRequest(content=png(1))
        )
    )
    answer = await call.read()
    assert answer.request_id == rid
    return call


async def test_streams_beyond_the_front_s_limit_are_refused_and_health_still_answers(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    settings = local_settings(tmp_path)
    settings.server.front_threads = 8  # room for 6 streams
    async with _served_alone(settings, tiny_models.first) as (channel, _):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        streams = [await _open_stream(stub, f"s{i}") for i in range(6)]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _open_stream(stub, "one too many")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "6 streams" in (refused.value.details() or "")
        assert "FRONT_THREADS" in (refused.value.details() or "")
        # The threads kept aside answer health checks and unary calls at once.
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = await stub.Classify(inference_pb2.ClassifyRequest(content=png(2)), timeout=30)
        assert reply.top_classes
        # A stream that ends gives its place back.
        await streams[0].done_writing()
        assert await streams[0].read() == grpc.aio.EOF
        streams[1].cancel()
        streams[2:] += [await _open_stream(stub, "after"), await _open_stream(stub, "again")]
        for call in streams[2:]:
            call.cancel()


async def test_a_temporary_folder_too_deep_for_a_socket_path_still_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The grpc.aio server behind the front listens on a Unix socket in a temporary folder; a
    # socket's path holds at most 107 bytes.
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    server, address = await start_alone(local_settings(tmp_path))
    try:
        assert server.front is not None
        socket = Path(server.front.folder.name) / "upstream.sock"
        assert len(str(socket)) <= 107
        async with grpc.aio.insecure_channel(address) as channel:
            # Forwarded: it reaches the grpc.aio server through that socket.
            listing = await inference_pb2_grpc.InferenceServiceStub(channel).ListModelVersions(
                inference_pb2.ListModelVersionsRequest(), timeout=30
            )
            assert list(listing.model_versions) == []
    finally:
        await server.stop(grace=0)
    assert not socket.parent.exists()  # the private folder goes with the server
