"""The StorageService contract over real gRPC, on the local folder, MinIO and SeaweedFS."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest

from imagemesh.storage.v1 import storage_pb2
from tests.fixtures.served_search import eventually
from tests.storage_service.images import png, sha
from tests.storage_service.rpc import aiter_of, download, header, upload


async def test_upload_stores_a_content_addressed_image_with_its_metadata(storage_server):
    data = png(32, seed=1)
    reply = await upload(
        storage_server.stub,
        data,
        header(
            "cats/cat_0001.png",
            dataset="pets",
            label="cat",
            tags=["cute", "small"],
            attributes={"source": "camera 3"},
            expected_sha256=sha(data),
            expected_size_bytes=len(data),
            content_type="image/png",
        ),
        chunk=100,
    )
    image = reply.image
    assert not reply.duplicate
    assert image.name == f"images/{sha(data)}"
    assert image.sha256 == sha(data)
    assert (image.width, image.height, image.size_bytes) == (32, 32, len(data))
    assert image.format == storage_pb2.IMAGE_FORMAT_PNG
    assert image.content_type == "image/png"
    assert (image.dataset, image.label, image.filename) == ("pets", "cat", "cats/cat_0001.png")
    assert list(image.tags) == ["cute", "small"]
    assert dict(image.attributes) == {"source": "camera 3"}
    got = await storage_server.stub.GetImage(storage_pb2.GetImageRequest(name=image.name))
    assert got.image == image
    _, content = await download(storage_server.stub, image.name)
    assert content == data


async def test_same_bytes_twice_are_stored_once_and_flagged_duplicate(storage_server):
    data = png(16, seed=2)
    first = await upload(storage_server.stub, data, header("a.png", dataset="one"))
    second = await upload(storage_server.stub, data, header("b.png", dataset="two"))
    assert second.duplicate
    assert second.image == first.image  # the image stored first, unchanged
    image_keys = storage_server.object_keys("images/")
    assert image_keys == [f"images/{sha(data)[:2]}/{sha(data)}"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
async def test_every_supported_format_is_detected(storage_server, fmt):
    data = png(24, seed=3, fmt=fmt)
    reply = await upload(storage_server.stub, data, header(f"x.{fmt.lower()}"))
    assert storage_pb2.ImageFormat.Name(reply.image.format) == f"IMAGE_FORMAT_{fmt}"
    assert (reply.image.width, reply.image.height) == (24, 24)


async def test_large_upload_streams_through_the_spill_path(storage_server):
    # Over the 8 MiB in-memory limit: staged on disk (and, with the hash announced, streamed
    # to the store as a multipart upload) before it commits.
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(1800, 1800, 3), dtype=np.uint8)
    out = io.BytesIO()
    from PIL import Image

    Image.fromarray(pixels).save(out, "PNG", compress_level=0)
    data = out.getvalue()
    assert len(data) > 9 * 1024 * 1024
    # Unannounced hash (spill file, then a store write), announced hash (streamed to the
    # store as it arrives), then the same bytes again (a duplicate, nothing written).
    for announce, duplicate in ((False, False), (True, False), (True, True)):
        head = header("big.png", expected_sha256=sha(data) if announce else "")
        reply = await upload(storage_server.stub, data, head, chunk=1024 * 1024)
        assert reply.duplicate == duplicate
        assert reply.image.width == 1800
        _, content = await download(storage_server.stub, reply.image.name)
        assert sha(content) == sha(data)
        if not announce:
            await storage_server.stub.DeleteImage(
                storage_pb2.DeleteImageRequest(name=reply.image.name)
            )
    assert not list((storage_server.runtime.domain._spill_dir).iterdir())


@pytest.mark.parametrize(("offset", "length"), [(0, 0), (10, 0), (10, 25), (0, 1), (99, 0)])
async def test_download_returns_the_requested_range(storage_server, offset, length):
    data = png(64, seed=4)
    name = (await upload(storage_server.stub, data)).image.name
    image, content = await download(storage_server.stub, name, offset, length)
    end = offset + length if length else None
    assert content == data[offset:end]
    assert image.name == name


async def test_list_pages_through_a_dataset_in_a_stable_order(storage_server):
    names = []
    for seed in range(7):
        reply = await upload(storage_server.stub, png(8, seed=100 + seed), header(dataset="pages"))
        names.append(reply.image.name)
    await upload(storage_server.stub, png(8, seed=200), header(dataset="other"))
    seen, token = [], ""
    while True:
        page = await storage_server.stub.ListImages(
            storage_pb2.ListImagesRequest(dataset="pages", page_size=3, page_token=token)
        )
        assert len(page.images) <= 3
        seen += [image.name for image in page.images]
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    default = await storage_server.stub.ListImages(storage_pb2.ListImagesRequest())
    assert list(default.images) == []


async def test_a_deleted_image_leaves_its_dataset_listing(storage_server):
    keep = (await upload(storage_server.stub, png(8, seed=11), header(dataset="d"))).image
    gone = (await upload(storage_server.stub, png(8, seed=12), header(dataset="d"))).image
    await storage_server.stub.DeleteImage(storage_pb2.DeleteImageRequest(name=gone.name))
    page = await storage_server.stub.ListImages(storage_pb2.ListImagesRequest(dataset="d"))
    assert [i.name for i in page.images] == [keep.name]
    # Re-uploaded into another dataset, it shows there and not in the old one.
    again = await upload(storage_server.stub, png(8, seed=12), header(dataset="e"))
    assert not again.duplicate
    page = await storage_server.stub.ListImages(storage_pb2.ListImagesRequest(dataset="d"))
    assert [i.name for i in page.images] == [keep.name]
    page = await storage_server.stub.ListImages(storage_pb2.ListImagesRequest(dataset="e"))
    assert [i.name for i in page.images] == [gone.name]


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


async def test_delete_removes_the_image_its_arrays_and_predictions(storage_server):
    data = png(8, seed=20)
    image = (await upload(storage_server.stub, data)).image
    digest = image.sha256
    probs = _npy(np.array([0.1, 0.9], dtype="<f4"))
    await storage_server.stub.PutArray(
        storage_pb2.PutArrayRequest(
            name=f"arrays/features/b1/{digest}.npy", npy_content=probs, image=image.name
        )
    )
    # A prediction and a model input written without `image` (as batch jobs write them) are
    # still found by their conventional paths.
    for kind in ("predictions", "inputs"):
        await storage_server.stub.PutArray(
            storage_pb2.PutArrayRequest(
                name=f"arrays/{kind}/flowers/v3/{digest}.npy", npy_content=probs
            )
        )
    await storage_server.stub.PutArray(
        storage_pb2.PutArrayRequest(name="arrays/unrelated.npy", npy_content=probs)
    )
    reply = await storage_server.stub.DeleteImage(storage_pb2.DeleteImageRequest(name=image.name))
    assert reply.deleted_array_count == 3
    remaining = [k for k in storage_server.object_keys() if not k.startswith("datasets/")]
    assert remaining == ["arrays/unrelated.npy"]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await storage_server.stub.GetImage(storage_pb2.GetImageRequest(name=image.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await storage_server.stub.DeleteImage(storage_pb2.DeleteImageRequest(name=image.name))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_arrays_round_trip_list_and_delete(storage_server):
    arrays = {
        f"arrays/features/densenet/{i:02d}.npy": np.arange(i + 1, dtype="<f4") for i in range(5)
    }
    for name, array in arrays.items():
        reply = await storage_server.stub.PutArray(
            storage_pb2.PutArrayRequest(
                name=name,
                npy_content=_npy(array),
                expected_dtype="<f4",
                expected_shape=[array.size],
            )
        )
        assert (reply.array.dtype, list(reply.array.shape)) == ("<f4", [array.size])
    got = await storage_server.stub.GetArray(
        storage_pb2.GetArrayRequest(name="arrays/features/densenet/03.npy")
    )
    assert np.array_equal(np.load(io.BytesIO(got.npy_content)), arrays[got.array.name])
    assert list(got.array.shape) == [4]
    listed, token = [], ""
    while True:
        page = await storage_server.stub.ListArrays(
            storage_pb2.ListArraysRequest(prefix="arrays/features/", page_size=2, page_token=token)
        )
        listed += [(a.name, list(a.shape)) for a in page.arrays]
        token = page.next_page_token
        if not token:
            break
    assert listed == [(name, [a.size]) for name, a in arrays.items()]
    await storage_server.stub.DeleteArray(
        storage_pb2.DeleteArrayRequest(name="arrays/features/densenet/00.npy")
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await storage_server.stub.GetArray(
            storage_pb2.GetArrayRequest(name="arrays/features/densenet/00.npy")
        )
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # Replacing an array is idempotent.
    name = "arrays/features/densenet/01.npy"
    for _ in range(2):
        await storage_server.stub.PutArray(
            storage_pb2.PutArrayRequest(name=name, npy_content=_npy(arrays[name]))
        )
    assert len(storage_server.object_keys("arrays/")) == 4


async def test_bulk_upload_acknowledges_each_image_once(storage_server):
    good = [png(8, seed=300 + i) for i in range(40)]
    requests = [
        storage_pb2.BulkUploadImagesRequest(
            request_id=f"r{i}", header=header(f"{i}.png", dataset="bulk", label="x"), content=d
        )
        for i, d in enumerate(good)
    ]
    requests.append(
        storage_pb2.BulkUploadImagesRequest(
            request_id="dup", header=header("again.png", dataset="bulk"), content=good[0]
        )
    )
    requests.append(
        storage_pb2.BulkUploadImagesRequest(
            request_id="bad", header=header("bad.png", dataset="bulk"), content=b"not an image"
        )
    )
    acks = {}
    async for ack in storage_server.stub.BulkUploadImages(aiter_of(requests)):
        assert ack.request_id not in acks
        acks[ack.request_id] = ack
    assert len(acks) == len(requests)
    assert all(acks[f"r{i}"].outcome == storage_pb2.UPLOAD_OUTCOME_STORED for i in range(40))
    assert acks["dup"].outcome == storage_pb2.UPLOAD_OUTCOME_DUPLICATE
    assert acks["dup"].image.name == acks["r0"].image.name
    assert acks["bad"].outcome == storage_pb2.UPLOAD_OUTCOME_REJECTED
    assert acks["bad"].error.code == "INVALID_ARGUMENT"
    assert acks["bad"].error.reason == "UNSUPPORTED_IMAGE_FORMAT"
    listed, token = [], ""
    while True:
        page = await storage_server.stub.ListImages(
            storage_pb2.ListImagesRequest(dataset="bulk", page_size=1000, page_token=token)
        )
        listed += [image.sha256 for image in page.images]
        token = page.next_page_token
        if not token:
            break
    assert sorted(listed) == sorted(sha(d) for d in good)


async def test_stored_and_deleted_images_reach_the_search_index(storage_server):
    search = storage_server.search
    image = (await upload(storage_server.stub, png(8, seed=40), header(label="dog"))).image
    await search.wait_for_names({image.name})
    document = (await search.documents())[image.name]
    assert (document.label, document.dataset, document.width) == ("dog", "default", 8)
    assert document.size_bytes == image.size_bytes
    await storage_server.stub.DeleteImage(storage_pb2.DeleteImageRequest(name=image.name))
    await search.wait_for_names(set())
    # The outbox marks the delete done once it was answered.
    await eventually(lambda: storage_server.runtime.outbox.pending() == 0)


async def test_arrays_written_without_metadata_are_described_by_their_header(storage_server):
    # As batch jobs write them: the bare `.npy` bytes, no dtype/shape metadata; one array
    # large enough that reading it whole just to list it would show (3 MiB).
    big = np.zeros((512, 512, 3), dtype="<f4")
    small = np.arange(5, dtype="<i8")
    storage_server.store.put_bytes("arrays/inputs/m/v1/big.npy", _npy(big))
    storage_server.store.put_bytes("arrays/inputs/m/v1/small.npy", _npy(small))
    page = await storage_server.stub.ListArrays(
        storage_pb2.ListArraysRequest(prefix="arrays/inputs/m/v1/")
    )
    facts = {a.name: (a.dtype, list(a.shape), a.size_bytes) for a in page.arrays}
    assert facts == {
        "arrays/inputs/m/v1/big.npy": ("<f4", [512, 512, 3], len(_npy(big))),
        "arrays/inputs/m/v1/small.npy": ("<i8", [5], len(_npy(small))),
    }
    got = await storage_server.stub.GetArray(
        storage_pb2.GetArrayRequest(name="arrays/inputs/m/v1/small.npy")
    )
    assert (got.array.dtype, list(got.array.shape)) == ("<i8", [5])
    assert np.array_equal(np.load(io.BytesIO(got.npy_content)), small)
