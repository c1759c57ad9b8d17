"""Client-side helpers for the storage RPC tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagemesh.storage.v1 import storage_pb2

CHUNK = 64 * 1024


def header(filename: str = "img.png", **fields) -> storage_pb2.UploadImageHeader:
    return storage_pb2.UploadImageHeader(filename=filename, **fields)


def upload_messages(
    data: bytes, head: storage_pb2.UploadImageHeader | None = None, chunk: int = CHUNK
) -> list[storage_pb2.UploadImageRequest]:
    messages = [storage_pb2.UploadImageRequest(header=head or header())]
    messages += [
        storage_pb2.UploadImageRequest(chunk=data[i : i + chunk])
        for i in range(0, len(data), chunk)
    ]
    return messages


async def aiter_of(messages: Iterable) -> AsyncIterator:
    for message in messages:
        yield message


async def send_stream(method, messages: Iterable):
    """Calls a client-streaming RPC, writing `messages` one by one.

    A server may answer before it read everything (e.g. it refused the header); writes
    after that fail, and the call's own status is what the caller must see.
    """
    call = method()
    for message in messages:
        try:
            await call.write(message)
        except Exception:
            break
    else:
        with contextlib.suppress(Exception):
            await call.done_writing()
    return await call


async def upload(stub, data: bytes, head=None, chunk: int = CHUNK):
    return await send_stream(stub.UploadImage, upload_messages(data, head, chunk))


async def download(stub, name: str, offset: int = 0, length: int = 0) -> tuple[object, bytes]:
    image = None
    parts = []
    async for reply in stub.DownloadImage(
        storage_pb2.DownloadImageRequest(name=name, offset=offset, length=length)
    ):
        if reply.HasField("image"):
            image = reply.image
        parts.append(reply.chunk)
    return image, b"".join(parts)


def reason_of(error) -> str:
    """The ErrorInfo reason in a failed call's status details."""
    status = rpc_status.from_call(error)
    assert status is not None, "the status carries no details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo in the status details")
