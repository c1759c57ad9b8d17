"""Every bad input the issue lists, over a real gRPC channel, on every backend.

Each case checks: the status code and ErrorInfo reason, a message a person can act on,
nothing left in the store (listed directly) or the spill folder, no orphan entry reaching
the search index, and that a good call works right after.
"""

from __future__ import annotations

import asyncio
import io
import itertools

import grpc
import numpy as np
import pytest

from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from storage_service.backends import open_object_store
from tests.storage_service.conftest import StorageServer, start_storage
from tests.storage_service.images import bomb_png, png, sha
from tests.storage_service.rpc import (
    aiter_of,
    header,
    reason_of,
    send_stream,
    upload,
    upload_messages,
)

MIB = 1024 * 1024
_seeds = itertools.count(10_000)


@pytest.fixture
async def baseline(storage_server):
    """The server with one good image stored; yields (server, keys before the bad call)."""
    reply = await upload(storage_server.stub, png(8, seed=next(_seeds)), header(dataset="base"))
    await storage_server.search.wait_for_names({reply.image.name})
    return storage_server, storage_server.object_keys()


async def _assert_nothing_left_and_still_serving(server, before):
    # An aborted multipart upload may finish rolling back a moment after the call ended.
    spill_dir = server.runtime.domain._spill_dir
    for _ in range(100):
        if server.object_keys() == before and not list(spill_dir.iterdir()):
            break
        await asyncio.sleep(0.1)
    assert server.object_keys() == before
    assert not list(spill_dir.iterdir())
    # Nothing was queued for the index: every pending or sent document is a stored image.
    await asyncio.sleep(0.05)
    for name in await server.search.documents():
        assert server.store.exists(f"images/{name[7:9]}/{name[7:]}")
    assert server.runtime.outbox.pending() == 0
    good = png(8, seed=next(_seeds))
    reply = await upload(server.stub, good, header(dataset="base"))
    assert reply.image.sha256 == sha(good)


async def _expect(call, code, reason, words=""):
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    assert reason_of(raised.value) == reason
    assert words.lower() in raised.value.details().lower()
    return raised.value


def _truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _big_png() -> bytes:
    rng = np.random.default_rng(7)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (1800, 1800, 3), dtype=np.uint8)).save(
        out, "PNG", compress_level=0
    )
    return out.getvalue()


INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_checksum_mismatch(baseline):
    server, before = baseline
    data = png(16, seed=1)
    await _expect(
        upload(server.stub, data, header(expected_sha256="0" * 64)),
        INVALID,
        "CHECKSUM_MISMATCH",
        "nothing was stored",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_checksum_mismatch_of_a_large_streamed_upload(baseline):
    # The announced hash makes the server stream the bytes to their final key while they
    # arrive; the mismatch found at the end must abort that write.
    server, before = baseline
    data = _big_png()
    wrong = sha(data[:-1] + b"x")
    await _expect(
        upload(server.stub, data, header(expected_sha256=wrong), chunk=MIB),
        INVALID,
        "CHECKSUM_MISMATCH",
    )
    await _assert_nothing_left_and_still_serving(server, before)
    assert not server.store.exists(f"images/{wrong[:2]}/{wrong}")


async def test_size_mismatch(baseline):
    server, before = baseline
    data = png(16, seed=2)
    await _expect(
        upload(server.stub, data, header(expected_size_bytes=len(data) + 1)),
        INVALID,
        "SIZE_MISMATCH",
    )
    await _expect(
        upload(server.stub, data, header(expected_size_bytes=len(data) - 1)),
        INVALID,
        "SIZE_MISMATCH",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_chunks_before_the_header(baseline):
    server, before = baseline
    messages = upload_messages(png(8, seed=3))
    await _expect(
        send_stream(server.stub.UploadImage, [messages[1], messages[0], *messages[2:]]),
        INVALID,
        "MISSING_HEADER",
        "first message",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_a_second_header(baseline):
    server, before = baseline
    messages = upload_messages(png(8, seed=4), chunk=50)
    await _expect(
        send_stream(server.stub.UploadImage, [*messages[:2], messages[0], *messages[2:]]),
        INVALID,
        "SECOND_HEADER",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_an_empty_stream_and_a_header_without_bytes(baseline):
    server, before = baseline
    await _expect(send_stream(server.stub.UploadImage, []), INVALID, "EMPTY_STREAM", "empty")
    await _expect(
        server.stub.UploadImage(aiter_of([storage_pb2.UploadImageRequest(header=header())])),
        INVALID,
        "EMPTY_IMAGE",
    )
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize("announce_hash", [True, False])
async def test_a_client_that_cancels_mid_stream(baseline, announce_hash):
    server, before = baseline
    data = _big_png()
    messages = upload_messages(
        data, header(expected_sha256=sha(data) if announce_hash else ""), chunk=MIB
    )
    sent = asyncio.Event()

    async def requests():
        for i, message in enumerate(messages):
            if i == 10:  # past the in-memory limit: spilled, and streaming when announced
                sent.set()
                await asyncio.sleep(3600)
            yield message

    call = server.stub.UploadImage(requests())
    await sent.wait()
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await _assert_nothing_left_and_still_serving(server, before)


async def test_an_object_over_the_maximum_size(backend_settings, search_service, tmp_path):
    backend_settings.max_object_bytes = 2 * MIB
    server, address, runtime = await start_storage(
        backend_settings, search_service.address, tmp_path
    )
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            view = StorageServer(
                address,
                storage_pb2_grpc.StorageServiceStub(channel),
                open_object_store(backend_settings),
                runtime,
                search_service,
            )
            before = view.object_keys()
            data = _big_png()
            await _expect(
                upload(view.stub, data, header(), chunk=MIB),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "OBJECT_TOO_LARGE",
                "maximum",
            )
            # Announced up front: refused before any byte is read.
            await _expect(
                upload(view.stub, data, header(expected_size_bytes=len(data)), chunk=MIB),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "OBJECT_TOO_LARGE",
            )
            acks = [
                ack
                async for ack in view.stub.BulkUploadImages(
                    aiter_of(
                        [
                            storage_pb2.BulkUploadImagesRequest(
                                request_id="big", header=header(), content=data[: 3 * MIB]
                            )
                        ]
                    )
                )
            ]
            assert acks[0].error.code == "RESOURCE_EXHAUSTED"
            await _assert_nothing_left_and_still_serving(view, before)
    finally:
        await server.stop(grace=0)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"this is not an image at all", "UNSUPPORTED_IMAGE_FORMAT"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "UNSUPPORTED_IMAGE_FORMAT"),
        (_truncated(png(64, seed=5)), "CORRUPT_IMAGE"),
        (_truncated(png(64, seed=6, fmt="JPEG")), "CORRUPT_IMAGE"),
        (_truncated(png(64, seed=7, fmt="WEBP")), "CORRUPT_IMAGE"),
        (png(8, seed=8, fmt="PPM"), "UNSUPPORTED_IMAGE_FORMAT"),
    ],
    ids=["text", "png-header-only", "truncated-png", "truncated-jpeg", "truncated-webp", "ppm"],
)
async def test_undecodable_or_truncated_images(baseline, data, reason):
    server, before = baseline
    error = await _expect(upload(server.stub, data), INVALID, reason)
    assert "image" in error.details()
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (9_000, 9_000)])
async def test_a_decompression_bomb(baseline, width, height):
    # 400 Mpx trips Pillow's own guard; 81 Mpx only the server's 64 Mpx limit.
    server, before = baseline
    await _expect(
        upload(server.stub, bomb_png(width, height)),
        INVALID,
        "IMAGE_TOO_LARGE",
        "decompression bomb",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_a_declared_content_type_that_lies(baseline):
    server, before = baseline
    await _expect(
        upload(server.stub, png(8, seed=9), header(content_type="image/jpeg")),
        INVALID,
        "CONTENT_TYPE_MISMATCH",
    )
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize(
    "filename",
    ["../etc/passwd", "a/../b.png", "nul\x00.png", "a//b.png", "/abs.png", "x" * 1025, ""],
    ids=["dotdot", "inner-dotdot", "nul", "double-slash", "leading-slash", "too-long", "empty"],
)
async def test_bad_filenames(baseline, filename):
    server, before = baseline
    await _expect(
        upload(server.stub, png(8, seed=10), header(filename)), INVALID, "INVALID_FILENAME"
    )
    acks = [
        a
        async for a in server.stub.BulkUploadImages(
            aiter_of(
                [
                    storage_pb2.BulkUploadImagesRequest(
                        request_id="1", header=header(filename), content=png(8, seed=10)
                    )
                ]
            )
        )
    ]
    assert acks[0].outcome == storage_pb2.UPLOAD_OUTCOME_REJECTED
    assert acks[0].error.reason == "INVALID_FILENAME"
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize("name", ["images/../x", "images/" + "a" * 63, "images/" + "A" * 64, ""])
async def test_bad_image_names(baseline, name):
    server, before = baseline
    await _expect(
        server.stub.GetImage(storage_pb2.GetImageRequest(name=name)),
        INVALID,
        "INVALID_IMAGE_NAME",
    )
    await _expect(
        server.stub.DeleteImage(storage_pb2.DeleteImageRequest(name=name)),
        INVALID,
        "INVALID_IMAGE_NAME",
    )
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize(
    "dataset", ["Upper", "a/b", "-lead", "x" * 64, "with space", "dots..ok/../no", "é"]
)
async def test_dataset_names_a_backend_would_reject(baseline, dataset):
    server, before = baseline
    await _expect(
        upload(server.stub, png(8, seed=11), header(dataset=dataset)), INVALID, "INVALID_DATASET"
    )
    await _expect(
        server.stub.ListImages(storage_pb2.ListImagesRequest(dataset=dataset)),
        INVALID,
        "INVALID_DATASET",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_bad_labels_tags_and_attributes(baseline):
    server, before = baseline
    for head, reason in [
        (header(label="x" * 129), "INVALID_LABEL"),
        (header(label="semi;colon"), "INVALID_LABEL"),
        (header(tags=["t"] * 33), "INVALID_TAGS"),
        (header(tags=["bad\nnewline"]), "INVALID_TAGS"),
        (header(attributes={"Bad": "x"}), "INVALID_ATTRIBUTES"),
        (header(attributes={"k": "v" * 1025}), "INVALID_ATTRIBUTES"),
        (header(expected_sha256="XYZ"), "INVALID_SHA256"),
    ]:
        await _expect(upload(server.stub, png(8, seed=12), head), INVALID, reason)
    await _assert_nothing_left_and_still_serving(server, before)


async def test_a_tampered_page_token(baseline):
    server, before = baseline
    for seed in range(3):
        await upload(server.stub, png(8, seed=500 + seed), header(dataset="paged"))
    before = server.object_keys()
    page = await server.stub.ListImages(storage_pb2.ListImagesRequest(dataset="paged", page_size=1))
    token = page.next_page_token
    assert token
    tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    await _expect(
        server.stub.ListImages(
            storage_pb2.ListImagesRequest(dataset="paged", page_size=1, page_token=tampered)
        ),
        INVALID,
        "INVALID_PAGE_TOKEN",
        "start again",
    )
    # A genuine token for another dataset is refused too.
    await _expect(
        server.stub.ListImages(
            storage_pb2.ListImagesRequest(dataset="base", page_size=1, page_token=token)
        ),
        INVALID,
        "INVALID_PAGE_TOKEN",
    )
    await _expect(
        server.stub.ListImages(storage_pb2.ListImagesRequest(dataset="paged", page_size=1001)),
        INVALID,
        "INVALID_PAGE_SIZE",
    )
    await _assert_nothing_left_and_still_serving(server, before)


def _npy(array) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def _npz() -> bytes:
    out = io.BytesIO()
    np.savez(out, a=np.zeros(3))
    return out.getvalue()


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"npy_content": b"not a npy file"}, "INVALID_NPY"),
        ({"npy_content": _npy(np.zeros(100))[:-10]}, "INVALID_NPY"),
        ({"npy_content": _npy(np.zeros(10)) + b"junk"}, "INVALID_NPY"),
        ({"npy_content": _npz()}, "INVALID_NPY"),
        ({"npy_content": _npy(np.array([{"a": 1}], dtype=object))}, "NPY_OBJECT_DTYPE"),
        ({"npy_content": _npy(np.zeros(3, "<f4")), "expected_dtype": "<f8"}, "NPY_DTYPE_MISMATCH"),
        ({"npy_content": _npy(np.zeros(3, "<f4")), "expected_dtype": "nonsense"}, "INVALID_DTYPE"),
        ({"npy_content": _npy(np.zeros((2, 3))), "expected_shape": [3, 2]}, "NPY_SHAPE_MISMATCH"),
        ({"npy_content": b""}, "INVALID_NPY"),
    ],
    ids=[
        "not-npy",
        "truncated",
        "trailing-bytes",
        "npz",
        "object",
        "dtype",
        "bad-dtype",
        "shape",
        "empty",
    ],
)
async def test_a_npy_that_is_not_one(baseline, request_fields, reason):
    server, before = baseline
    await _expect(
        server.stub.PutArray(
            storage_pb2.PutArrayRequest(name="arrays/features/x.npy", **request_fields)
        ),
        INVALID,
        reason,
    )
    await _assert_nothing_left_and_still_serving(server, before)


@pytest.mark.parametrize(
    "name", ["arrays/../x.npy", "arrays/a//b.npy", "arrays/x.txt", "models/m/x.npy", "arrays/"]
)
async def test_bad_array_names(baseline, name):
    server, before = baseline
    await _expect(
        server.stub.PutArray(storage_pb2.PutArrayRequest(name=name, npy_content=_npy(np.zeros(2)))),
        INVALID,
        "INVALID_ARRAY_NAME",
    )
    await _expect(
        server.stub.ListArrays(storage_pb2.ListArraysRequest(prefix="arrays/../")),
        INVALID,
        "INVALID_PREFIX",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_an_array_for_an_unknown_image(baseline):
    server, before = baseline
    await _expect(
        server.stub.PutArray(
            storage_pb2.PutArrayRequest(
                name="arrays/p/x.npy", npy_content=_npy(np.zeros(2)), image="images/" + "0" * 64
            )
        ),
        INVALID,
        "IMAGE_NOT_FOUND",
    )
    await _assert_nothing_left_and_still_serving(server, before)


async def test_download_ranges_out_of_bounds(baseline):
    server, before = baseline
    data = png(8, seed=13)
    name = (await upload(server.stub, data)).image.name
    before = server.object_keys()

    async def drain(**fields):
        async for _ in server.stub.DownloadImage(
            storage_pb2.DownloadImageRequest(name=name, **fields)
        ):
            pass

    await _expect(drain(offset=len(data)), INVALID, "INVALID_RANGE", "past the end")
    await _expect(drain(offset=-1), INVALID, "INVALID_RANGE")
    await _expect(drain(length=-5), INVALID, "INVALID_RANGE")
    await _assert_nothing_left_and_still_serving(server, before)
