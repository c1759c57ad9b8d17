"""Fixtures for the storage service's tests: an object store on each backend in turn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from imagemesh.config import S3Settings, StorageBackend, StorageSettings, load_settings
from imagemesh.mesh import build_mesh
from imagemesh.storage.v1 import storage_pb2_grpc
from storage_service.backends import ObjectStore, open_object_store
from storage_service.mount import StorageRuntime
from tests.fixtures.engines import S3Bucket
from tests.fixtures.served_search import ServedSearch

# The same contract runs on the embedded default and on both real S3 servers.
BACKENDS = [
    "local",
    pytest.param("minio", marks=pytest.mark.engines),
    pytest.param("seaweed", marks=pytest.mark.engines),
]


def storage_settings_for(bucket: S3Bucket | None, tmp_path: Path) -> StorageSettings:
    """StorageSettings for a local folder under tmp_path, or for `bucket` when given."""
    if bucket is None:
        return StorageSettings(backend=StorageBackend.LOCAL, local_root=tmp_path / "objects")
    return StorageSettings(
        backend=StorageBackend.S3,
        local_root=tmp_path / "objects",
        s3=S3Settings(
            endpoint=bucket.host,
            access_key=bucket.access_key,
            secret_key=bucket.secret_key,
            bucket=bucket.name,
        ),
    )


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    """StorageSettings for a fresh, empty store on each backend in turn."""
    bucket: S3Bucket | None = None
    if request.param != "local":
        bucket = request.getfixturevalue(f"{request.param}_bucket")
    return storage_settings_for(bucket, tmp_path)


# -- a storage server over a real channel ------------------------------------------------


def dead_address() -> str:
    """An address where nothing listens (a port bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@dataclass
class StorageServer:
    """A running storage service, a stub to it, and a direct view of its store."""

    address: str
    stub: storage_pb2_grpc.StorageServiceStub
    store: ObjectStore
    runtime: StorageRuntime
    search: ServedSearch | None

    def object_keys(self, prefix: str = "") -> list[str]:
        """Every object in the store (what "nothing left behind" is checked against)."""
        return list(self.store.list_keys(prefix))


async def start_storage(storage, search_address: str, tmp_path: Path, **overrides):
    """Starts the storage service alone; returns (server, address, runtime)."""
    settings = load_settings(
        storage=storage.model_dump(),
        search_address=search_address,
        **overrides,
    )
    settings.storage.state_dir = tmp_path / "state"
    settings.server.access_log = False
    server, port = build_mesh(settings, ["storage"], port=0)
    await server.start()
    runtime = server.mounts[0].runtime[0]  # type: ignore[attr-defined]
    return server, f"127.0.0.1:{port}", runtime


@pytest.fixture
async def search_service(tmp_path: Path) -> AsyncIterator[ServedSearch]:
    """The real SearchService on SQLite, on a port of its own."""
    served = ServedSearch(tmp_path / "search")
    await served.start()
    yield served
    await served.stop()


@pytest.fixture
async def storage_server(
    backend_settings: StorageSettings, tmp_path: Path, search_service: ServedSearch
) -> AsyncIterator[StorageServer]:
    """The storage service on each backend in turn, telling the real search service."""
    server, address, runtime = await start_storage(
        backend_settings, search_service.address, tmp_path
    )
    channel = grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    try:
        yield StorageServer(
            address=address,
            stub=storage_pb2_grpc.StorageServiceStub(channel),
            store=open_object_store(backend_settings),
            runtime=runtime,
            search=search_service,
        )
    finally:
        await channel.close()
        await server.stop(grace=0)
        await asyncio.sleep(0)
