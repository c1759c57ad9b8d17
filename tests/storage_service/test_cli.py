"""`imagemesh upload`, `imagemesh images ...` and `imagemesh reindex` against a real server."""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import numpy as np
from PIL import Image

from imagemesh.cli import main
from imagemesh.config import StorageSettings, load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from tests.storage_service.conftest import dead_address, start_storage
from tests.storage_service.images import png


async def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, list(argv))
    return code, capsys.readouterr().out


async def test_upload_list_download_delete_and_reindex(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            (folder / label / f"{i}.png").write_bytes(png(8, seed=hash((label, i)) % 10_000))
    (folder / "dog" / "broken.png").write_bytes(b"not an image")
    big = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 255, (1300, 1300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(big, "PNG", compress_level=0)
    (folder / "cat" / "big.png").write_bytes(big.getvalue())  # > 4 MiB: streamed upload

    settings = StorageSettings(local_root=tmp_path / "objects")
    monkeypatch.setenv("IMAGEMESH_STORAGE__LOCAL_ROOT", str(tmp_path / "objects"))
    monkeypatch.setenv("IMAGEMESH_SERVER__LOG_LEVEL", "WARNING")
    server, address, _ = await start_storage(settings, dead_address(), tmp_path)
    try:
        code, out = await _cli(
            capsys,
            "upload",
            str(folder),
            "--address",
            address,
            "--dataset",
            "pets",
            "--labels-from-folders",
            "--json",
        )
        summary = json.loads(out)
        assert code == 1  # one file was rejected
        assert (summary["stored"], summary["duplicate"], summary["rejected"]) == (7, 0, 1)
        assert list(summary["rejected_files"]) == [str(folder / "dog" / "broken.png")]

        code, out = await _cli(
            capsys, "images", "list", "--dataset", "pets", "--all", "--json", "--address", address
        )
        listed = json.loads(out)["images"]
        assert code == 0
        assert len(listed) == 7
        assert {i["label"] for i in listed} == {"cat", "dog"}

        name = next(i["name"] for i in listed if i["filename"] == "big.png")
        target = tmp_path / "copy.png"
        code, _ = await _cli(
            capsys, "images", "download", name, "-o", str(target), "--address", address
        )
        assert code == 0
        assert target.read_bytes() == big.getvalue()

        code, out = await _cli(capsys, "images", "delete", name, "--address", address)
        assert code == 0
        code, _ = await _cli(capsys, "images", "get", name, "--address", address)
        assert code == 1

        # A real SearchService (SQLite, in its own mesh) whose index still holds the deleted
        # image, as if the delete had never reached it, and an entry of an image never stored.
        search_settings = load_settings(
            storage={"local_root": tmp_path / "mesh-objects"},
            search={"sqlite_path": tmp_path / "search.sqlite3"},
        )
        search_settings.server.access_log = False
        search_server, search_port = build_mesh(search_settings, port=0)
        await search_server.start()
        search_address = f"127.0.0.1:{search_port}"
        try:
            async with grpc.aio.insecure_channel(search_address) as channel:
                search = search_pb2_grpc.SearchServiceStub(channel)
                ghost = "images/" + "0" * 64
                await search.IndexImages(
                    search_pb2.IndexImagesRequest(
                        documents=[
                            search_pb2.ImageDocument(name=n, dataset="pets") for n in (name, ghost)
                        ],
                        refresh=search_pb2.REFRESH_POLICY_WAIT_FOR,
                    )
                )
                code, out = await _cli(capsys, "reindex", "--search-address", search_address)
                assert code == 0, out
                assert "reindexed 6 of 6 images" in out
                assert "2 index entries of images no longer stored removed" in out
                found = await search.SearchImages(search_pb2.SearchImagesRequest(page_size=100))
                assert sorted(d.name for d in found.documents) == sorted(
                    i["name"] for i in listed if i["name"] != name
                )
                assert {d.dataset for d in found.documents} == {"pets"}
        finally:
            await search_server.stop(grace=0)
        # The compacted dataset log lists the same images in the same order.
        code, out = await _cli(
            capsys, "images", "list", "--dataset", "pets", "--all", "--json", "--address", address
        )
        assert [i["name"] for i in json.loads(out)["images"]] == [
            i["name"] for i in listed if i["name"] != name
        ]
    finally:
        await server.stop(grace=0)
