"""The search index catches up by itself: uploads succeed while search is down, unreachable
or failing, and the durable outbox delivers once it is back, also across a restart."""

from __future__ import annotations

import asyncio
import itertools

import grpc

from imagemesh.config import StorageSettings, load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from tests.fixtures.served_search import ServedSearch
from tests.storage_service.conftest import dead_address, start_storage
from tests.storage_service.images import png
from tests.storage_service.rpc import header, upload


async def _wait(predicate, within_s: float = 20.0) -> None:
    """Polls `predicate` (sync or async) until it holds."""
    async with asyncio.timeout(within_s):
        for _ in itertools.count():
            held = predicate()
            if asyncio.iscoroutine(held):
                held = await held
            if held:
                return
            await asyncio.sleep(0.05)


def _fast_retries(runtime) -> None:
    # Keep the backoff short so the test sees the catch-up quickly (the schedule itself,
    # 0.2 s doubling to 30 s, is the production one).
    runtime.drainer._max_backoff_s = 0.5


async def test_uploads_succeed_while_search_is_unreachable_then_catch_up(tmp_path):
    search = ServedSearch(tmp_path / "search")
    await search.start()
    await search.stop()  # its port is now known, and nothing answers there
    settings = StorageSettings(local_root=tmp_path / "objects")
    server, storage_address, runtime = await start_storage(settings, search.address, tmp_path)
    _fast_retries(runtime)
    try:
        async with grpc.aio.insecure_channel(storage_address) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            names = [
                (await upload(stub, png(8, seed=i), header(dataset="late"))).image.name
                for i in range(5)
            ]
            gone = names.pop()
            await stub.DeleteImage(storage_pb2.DeleteImageRequest(name=gone))
            await _wait(lambda: runtime.drainer.failed_attempts >= 2)
            assert runtime.outbox.pending() == 5  # 4 index updates, 1 delete (coalesced)
            # Search comes up at the address the storage service was told.
            await search.start()
            await search.wait_for_names(set(names))
            await _wait(lambda: runtime.outbox.pending() == 0)
    finally:
        await server.stop(grace=0)
        await search.stop()


async def test_pending_updates_survive_a_restart(tmp_path):
    settings = StorageSettings(local_root=tmp_path / "objects")
    server, storage_address, runtime = await start_storage(settings, dead_address(), tmp_path)
    async with grpc.aio.insecure_channel(storage_address) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        name = (await upload(stub, png(8, seed=77), header(label="cat"))).image.name
    assert runtime.outbox.pending() == 1
    await server.stop(grace=0)

    search = ServedSearch(tmp_path / "search")
    await search.start()
    server, _, runtime = await start_storage(settings, search.address, tmp_path)
    try:
        await search.wait_for_names({name})
        assert (await search.documents())[name].label == "cat"
        await _wait(lambda: runtime.outbox.pending() == 0)
    finally:
        await server.stop(grace=0)
        await search.stop()


async def test_search_going_down_is_retried_until_it_is_back(
    backend_settings, search_service, tmp_path
):
    server, storage_address, runtime = await start_storage(
        backend_settings, search_service.address, tmp_path
    )
    _fast_retries(runtime)
    try:
        async with grpc.aio.insecure_channel(storage_address) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            first = (await upload(stub, png(8, seed=79))).image.name
            await search_service.wait_for_names({first})
            await search_service.stop()  # a real outage, after the service had been reached
            name = (await upload(stub, png(8, seed=78))).image.name
        await _wait(lambda: runtime.drainer.failed_attempts >= 2)
        assert runtime.outbox.pending() == 1
        await search_service.start()  # back on the same port, with the same index
        await search_service.wait_for_names({first, name})
        await _wait(lambda: runtime.outbox.pending() == 0)
    finally:
        await server.stop(grace=0)


async def test_with_the_real_search_service_uploads_and_deletes_are_searchable(tmp_path):
    settings = load_settings(
        storage={"local_root": tmp_path / "objects", "state_dir": tmp_path / "state"},
        search={"sqlite_path": tmp_path / "search.sqlite3"},
    )
    settings.server.access_log = False
    server, port = build_mesh(settings, ["storage", "search"], port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            search = search_pb2_grpc.SearchServiceStub(channel)
            image = (await upload(storage, png(8, seed=79), header(label="owl"))).image

            async def document_exists() -> bool:
                try:
                    await search.GetImageDocument(
                        search_pb2.GetImageDocumentRequest(name=image.name)
                    )
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                    return False
                return True

            async def document_gone() -> bool:
                return not await document_exists()

            await _wait(document_exists)
            await storage.DeleteImage(storage_pb2.DeleteImageRequest(name=image.name))
            await _wait(document_gone)
    finally:
        await server.stop(grace=0)
