"""The shared server bootstrap: health, reflection, UNIMPLEMENTED, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from imagemesh.config import Settings
from imagemesh.interceptors import (
    _RPC_SECONDS,
    _RPC_TOTAL,
    REQUEST_ID_KEY,
    ObservabilityInterceptor,
)
from imagemesh.server import MeshServer, ServiceMount, create_server
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from tests.fixtures.engines import REPO_ROOT
from tests.fixtures.served_search import eventually

SERVICES = [
    "imagemesh.storage.v1.StorageService",
    "imagemesh.search.v1.SearchService",
    "imagemesh.inference.v1.InferenceService",
]


async def test_health_reports_serving_for_each_service(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ["", *SERVICES]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_health_of_an_unknown_service_is_not_found(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_three_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    call = stub.ServerReflectionInfo(iter([request]))
    listed = {s.name async for reply in call for s in reply.list_services_response.service}
    assert set(SERVICES) <= listed
    assert "grpc.health.v1.Health" in listed


async def test_reflection_serves_the_contract_files(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="imagemesh.inference.v1.InferenceService"
    )
    replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    protos = replies[0].file_descriptor_response.file_descriptor_proto
    assert protos, "reflection returned no file for the inference service"


async def _reflect_symbol(
    channel: grpc.aio.Channel, symbol: str
) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    replies = [r async for r in stub.ServerReflectionInfo(iter([request]))]
    return replies[0]


async def test_reflection_resolves_a_method_s_full_name(channel: grpc.aio.Channel) -> None:
    # What ghz and `grpcurl describe Service.Method` ask for (grpcio-reflection alone: NOT_FOUND).
    reply = await _reflect_symbol(channel, "imagemesh.inference.v1.InferenceService.Classify")
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    files = {
        descriptor_pb2.FileDescriptorProto.FromString(raw).name
        for raw in reply.file_descriptor_response.file_descriptor_proto
    }
    assert "imagemesh/inference/v1/inference.proto" in files
    reply = await _reflect_symbol(channel, "imagemesh.inference.v1.InferenceService.NoSuchMethod")
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_ghz_load_tests_a_service_through_reflection_alone(
    mesh: tuple[MeshServer, str],
) -> None:
    # The real ghz, given no .proto file: it learns the method's types by reflection.
    tool = await asyncio.create_subprocess_exec(
        "bash",
        str(REPO_ROOT / "deploy" / "local" / "tools.sh"),
        "path",
        "ghz",
        stdout=asyncio.subprocess.PIPE,
    )
    ghz = (await tool.communicate())[0].decode().strip()
    run = await asyncio.create_subprocess_exec(
        ghz,
        "--insecure",
        "--call",
        "imagemesh.inference.v1.InferenceService.ListModelVersions",
        "--data",
        '{"page_size": 5}',
        "-n",
        "6",
        "-c",
        "2",
        "--format",
        "json",
        mesh[1],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(run.communicate(), timeout=120)
    assert run.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["statusCodeDistribution"] == {"OK": 6}


class _SlowStorage(storage_pb2_grpc.StorageServiceServicer):
    """A test double whose GetImage takes a while, to hold a call in flight."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    async def GetImage(
        self, request: storage_pb2.GetImageRequest, context: grpc.aio.ServicerContext
    ) -> storage_pb2.GetImageResponse:
        self.entered.set()
        await asyncio.sleep(0.5)
        return storage_pb2.GetImageResponse(image=storage_pb2.Image(name=request.name))


async def _start_slow_server(settings: Settings) -> tuple[MeshServer, int, _SlowStorage]:
    slow = _SlowStorage()
    mount = ServiceMount(
        name="imagemesh.storage.v1.StorageService",
        register=lambda s: storage_pb2_grpc.add_StorageServiceServicer_to_server(slow, s),
    )
    server, port = create_server(settings, [mount], port=0)
    await server.start()
    return server, port, slow


async def test_graceful_shutdown_lets_in_flight_calls_finish(
    embedded_settings: Settings,
) -> None:
    server, port, slow = await _start_slow_server(embedded_settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = storage_pb2_grpc.StorageServiceStub(chan)
        health = health_pb2_grpc.HealthStub(chan)
        in_flight = asyncio.ensure_future(
            stub.GetImage(storage_pb2.GetImageRequest(name="images/a"))
        )
        await slow.entered.wait()
        stopping = asyncio.ensure_future(server.stop(grace=5))
        await asyncio.sleep(0.05)
        # Health turns NOT_SERVING as soon as shutdown starts, before calls drain.
        assert server.health._server_status[""] == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await in_flight
        assert reply.image.name == "images/a"
        await stopping
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_shutdown_cuts_calls_that_outlive_the_grace_period(
    embedded_settings: Settings,
) -> None:
    server, port, slow = await _start_slow_server(embedded_settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
        stub = storage_pb2_grpc.StorageServiceStub(chan)
        in_flight = asyncio.ensure_future(
            stub.GetImage(storage_pb2.GetImageRequest(name="images/a"))
        )
        await slow.entered.wait()
        await server.stop(grace=0.05)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await in_flight
        assert info.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def test_every_call_gets_a_request_id_back(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    call = stub.Check(health_pb2.HealthCheckRequest(), metadata=((REQUEST_ID_KEY, "abc123"),))
    await call
    assert (REQUEST_ID_KEY, "abc123") in tuple(await call.trailing_metadata())
    other = stub.Check(health_pb2.HealthCheckRequest())
    await other
    generated = dict(await other.trailing_metadata())[REQUEST_ID_KEY]
    assert len(generated) == 32
    # A streamed response has it at the start too.
    watch = stub.Watch(health_pb2.HealthCheckRequest(), metadata=((REQUEST_ID_KEY, "s1"),))
    assert (REQUEST_ID_KEY, "s1") in tuple(await watch.initial_metadata())
    watch.cancel()


async def test_an_error_carries_its_request_id_with_its_details(
    channel: grpc.aio.Channel,
) -> None:
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    call = stub.GetImage(
        storage_pb2.GetImageRequest(name="not-an-image"), metadata=((REQUEST_ID_KEY, "e1"),)
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(raised.value.trailing_metadata() or ())
    assert trailers[REQUEST_ID_KEY] == "e1"
    assert "grpc-status-details-bin" in trailers


async def test_message_size_limit_is_the_configured_one(embedded_settings: Settings) -> None:
    embedded_settings.server.max_message_bytes = 2 * 1024 * 1024
    server, port, _ = await _start_slow_server(embedded_settings)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        ) as chan:
            stub = storage_pb2_grpc.StorageServiceStub(chan)
            # 3 MiB would pass gRPC's 4 MiB default but not the configured 2 MiB.
            big = storage_pb2.GetImageRequest(name="x" * (3 * 1024 * 1024))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetImage(big)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(grace=0)


def _rpc_count(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value("imagemesh_rpc_total", {"method": method, "code": code})
    return value or 0.0


async def test_each_call_is_counted_and_logged_after_its_answer(
    embedded_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    embedded_settings.server.access_log = True
    caplog.set_level(logging.INFO, logger="imagemesh.access")
    server, port = create_server(embedded_settings, [], port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            check = "/grpc.health.v1.Health/Check"
            ok, not_found = _rpc_count(check, "OK"), _rpc_count(check, "NOT_FOUND")
            await stub.Check(health_pb2.HealthCheckRequest(), metadata=((REQUEST_ID_KEY, "l1"),))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Check(
                    health_pb2.HealthCheckRequest(service="nope"),
                    metadata=((REQUEST_ID_KEY, "l2"),),
                )
            # Written on the server loop's next turn, after the answer.
            await eventually(lambda: _rpc_count(check, "NOT_FOUND") == not_found + 1, 5.0)
            assert _rpc_count(check, "OK") == ok + 1
            lines = {
                record.getMessage().split("request_id=")[1].split()[0]: record.getMessage()
                for record in caplog.records
                if record.name == "imagemesh.access"
            }
            assert f"method={check} code=OK duration_ms=" in lines["l1"]
            assert "code=NOT_FOUND" in lines["l2"]
            assert "peer=ipv4:127.0.0.1:" in lines["l1"]
    finally:
        await server.stop(grace=0)


class _FinishedCallContext:
    """Stand-in for a servicer context (named so): the case below, a stream's handler finalised
    after its event loop stopped, cannot be caused through a real server on purpose."""

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


def test_a_call_ending_outside_the_event_loop_is_still_counted() -> None:
    method = "/imagemesh.test.v1.Test/Finalised"
    before = _rpc_count(method, "OK")
    interceptor = ObservabilityInterceptor(access_log=False)
    interceptor._record_soon(  # no running loop here: written at once
        method,
        _RPC_TOTAL,
        _RPC_SECONDS.labels(method),
        "r1",
        _FinishedCallContext(),  # type: ignore[arg-type]
        None,
        0.0,
    )
    assert _rpc_count(method, "OK") == before + 1
