"""Images uploaded through StorageService become findable through SearchService, on SQLite and
on real Elasticsearch, with both services in one mesh talking over gRPC."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest
from PIL import Image

from imagemesh.config import load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from tests.search_service.servers import drop_template


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _upload(stub, data: bytes, header: storage_pb2.UploadImageHeader):
    async def messages():
        yield storage_pb2.UploadImageRequest(header=header)
        yield storage_pb2.UploadImageRequest(chunk=data)

    return await stub.UploadImage(messages())


@pytest.mark.parametrize("backend", ["sqlite", "elasticsearch"])
async def test_an_uploaded_image_is_found_by_its_metadata_soon_after(backend, tmp_path, request):
    search: dict = {"backend": backend, "sqlite_path": tmp_path / "search.sqlite3"}
    if backend == "elasticsearch":
        index = request.getfixturevalue("es_index")
        search["elasticsearch"] = {"url": index.url, "index_prefix": index.prefix}
        request.addfinalizer(lambda: drop_template(index.url, index.prefix))
    settings = load_settings(storage={"local_root": tmp_path / "objects"}, search=search)
    settings.server.access_log = False
    server, port = build_mesh(settings, ["storage", "search"], port=0)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            storage = storage_pb2_grpc.StorageServiceStub(channel)
            search_stub = search_pb2_grpc.SearchServiceStub(channel)
            header = storage_pb2.UploadImageHeader(
                filename="Harbour at Dawn.png",
                content_type="image/png",
                dataset="photos",
                label="boat",
                tags=["sea", "morning"],
            )
            uploaded = await _upload(storage, _png(7), header)
            name = uploaded.image.name
            started = time.monotonic()
            query = search_pb2.SearchImagesRequest(
                text="harbour dawn",
                filter=search_pb2.ImageFilter(datasets=["photos"], labels=["boat"], tags=["sea"]),
            )
            found: list[str] = []
            for _ in range(100):  # bounded poll; the delay is printed, not asserted
                found = [d.name for d in (await search_stub.SearchImages(query)).documents]
                if found:
                    break
                await asyncio.sleep(0.05)
            print(f"{backend}: findable {time.monotonic() - started:.3f} s after the upload")
            assert found == [name]
            doc = (
                await search_stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=name))
            ).document
            assert doc.filename == "Harbour at Dawn.png"
            assert doc.width == 8
            assert doc.height == 8
    finally:
        await server.stop(grace=0)
