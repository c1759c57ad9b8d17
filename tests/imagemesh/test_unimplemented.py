"""RPCs that are not built yet say so with UNIMPLEMENTED, nothing pretends to work."""

from __future__ import annotations

import grpc
import pytest

from imagemesh.config import Settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.server import ServiceMount, create_server
from imagemesh.storage.v1 import storage_pb2_grpc
from imagemesh.unimplemented import unimplemented_servicer


def test_unimplemented_servicer_overrides_every_rpc_but_the_kept_ones() -> None:
    class Partial(storage_pb2_grpc.StorageServiceServicer):
        async def GetImage(self, request: object, context: object) -> None:
            return None

    servicer = unimplemented_servicer(
        storage_pb2_grpc.StorageServiceServicer, "StorageService", keep=Partial
    )
    assert type(servicer).GetImage is Partial.GetImage
    assert type(servicer).ListImages is not storage_pb2_grpc.StorageServiceServicer.ListImages


async def test_unimplemented_rpc_answers_with_a_message_that_says_so(
    embedded_settings: Settings,
) -> None:
    servicer = unimplemented_servicer(
        inference_pb2_grpc.InferenceServiceServicer, "InferenceService"
    )
    mount = ServiceMount(
        name="imagemesh.inference.v1.InferenceService",
        register=lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s),
    )
    server, port = create_server(embedded_settings, [mount], port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = inference_pb2_grpc.InferenceServiceStub(chan)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.ListModelVersions(inference_pb2.ListModelVersionsRequest())
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert info.value.details() == (
                "InferenceService.ListModelVersions is not implemented by this server yet"
            )
            # A streaming RPC says so too.
            call = stub.WatchBatchJob(inference_pb2.WatchBatchJobRequest(name="batchJobs/x"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                [r async for r in call]
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace=0)
