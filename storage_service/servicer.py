"""The StorageService gRPC servicer: transport only.

Each handler turns the request into domain values, calls `StorageDomain`, turns the
result into the response, and maps domain errors to statuses with `abort_with`. Stream
shape rules (header first, exactly once, at least one message) are transport concerns and
are checked here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from imagemesh.common.v1 import common_pb2
from imagemesh.errors import ImageMeshError, InvalidArgument, Unavailable
from imagemesh.status import abort_with
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from storage_service.bulk import BulkItem, bulk_upload
from storage_service.records import ImageRecord
from storage_service.service import ArrayInfo, StorageDomain, UploadHeader

__all__ = ["StorageServicer", "image_proto"]

_Context = grpc.aio.ServicerContext[object, object]
_DRAIN_BYTES = 16 * 1024 * 1024
_DRAIN_SECONDS = 2.0

_FORMATS = {
    "png": storage_pb2.IMAGE_FORMAT_PNG,
    "jpeg": storage_pb2.IMAGE_FORMAT_JPEG,
    "webp": storage_pb2.IMAGE_FORMAT_WEBP,
    "bmp": storage_pb2.IMAGE_FORMAT_BMP,
    "tiff": storage_pb2.IMAGE_FORMAT_TIFF,
    "gif": storage_pb2.IMAGE_FORMAT_GIF,
}


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def image_proto(record: ImageRecord) -> storage_pb2.Image:
    """The `Image` message for a record."""
    return storage_pb2.Image(
        name=record.name,
        sha256=record.sha256,
        filename=record.filename,
        content_type=record.content_type,
        size_bytes=record.size_bytes,
        width=record.width,
        height=record.height,
        format=_FORMATS.get(record.format, storage_pb2.IMAGE_FORMAT_UNSPECIFIED),
        dataset=record.dataset,
        label=record.label,
        tags=list(record.tags),
        attributes=record.attributes,
        create_time=_timestamp(record.create_time),
    )


def _array_proto(info: ArrayInfo) -> storage_pb2.NdArray:
    return storage_pb2.NdArray(
        name=info.name,
        dtype=info.dtype,
        shape=list(info.shape),
        size_bytes=info.size_bytes,
        update_time=_timestamp(info.update_time),
    )


def _header(message: storage_pb2.UploadImageHeader) -> UploadHeader:
    return UploadHeader(
        filename=message.filename,
        content_type=message.content_type,
        dataset=message.dataset,
        label=message.label,
        tags=list(message.tags),
        attributes=dict(message.attributes),
        expected_sha256=message.expected_sha256,
        expected_size_bytes=message.expected_size_bytes,
    )


async def _upload_parts(
    requests: AsyncIterable[storage_pb2.UploadImageRequest],
) -> tuple[UploadHeader, AsyncIterator[bytes]]:
    stream = aiter(requests)
    first = await anext(stream, None)
    if first is None:
        raise InvalidArgument(
            "the upload stream was empty; send an UploadImageHeader, then the image in chunks",
            reason="EMPTY_STREAM",
            field="header",
        )
    if first.WhichOneof("payload") != "header":
        raise InvalidArgument(
            "the first message of an upload must be the header; a chunk came first",
            reason="MISSING_HEADER",
            field="header",
        )

    async def chunks() -> AsyncIterator[bytes]:
        async for message in stream:
            kind = message.WhichOneof("payload")
            if kind == "header":
                raise InvalidArgument(
                    "an upload has exactly one header, as its first message; a second came "
                    "after the chunks started",
                    reason="SECOND_HEADER",
                    field="header",
                )
            if kind == "chunk" and message.chunk:
                yield message.chunk

    return _header(first.header), chunks()


async def _drain_briefly(stream: AsyncIterator[storage_pb2.UploadImageRequest]) -> None:
    # A client still sending when the server answers may see its own failed write (grpc
    # reports INTERNAL) instead of our status. Reading what is already on its way, within a
    # small budget, lets a well-behaved client receive the real reason; a client streaming
    # gigabytes is cut off after the budget.
    budget = _DRAIN_BYTES
    try:
        async with asyncio.timeout(_DRAIN_SECONDS):
            async for message in stream:
                budget -= message.ByteSize()
                if budget <= 0:
                    return
    except (TimeoutError, grpc.RpcError, ImageMeshError):
        return


class StorageServicer(storage_pb2_grpc.StorageServiceServicer):
    """Serves `imagemesh.storage.v1.StorageService` over a `StorageDomain`."""

    def __init__(self, domain: StorageDomain | None = None, *, bulk_concurrency: int) -> None:
        # The domain is attached by the mount's start hook; the server may accept calls
        # a moment before that, and they are told to retry.
        self.domain = domain
        self._bulk_concurrency = bulk_concurrency

    @property
    def _domain(self) -> StorageDomain:
        if self.domain is None:
            raise Unavailable("the storage service is starting; retry shortly")
        return self.domain

    async def UploadImage(
        self,
        request_iterator: AsyncIterable[storage_pb2.UploadImageRequest],
        context: _Context,
    ) -> storage_pb2.UploadImageResponse:
        stream = aiter(request_iterator)
        try:
            header, chunks = await _upload_parts(stream)
            record, duplicate = await self._domain.upload(header, chunks)
        except ImageMeshError as exc:
            await _drain_briefly(stream)
            await abort_with(context, exc)
        return storage_pb2.UploadImageResponse(image=image_proto(record), duplicate=duplicate)

    async def BulkUploadImages(
        self,
        request_iterator: AsyncIterable[storage_pb2.BulkUploadImagesRequest],
        context: _Context,
    ) -> AsyncIterator[storage_pb2.BulkUploadImagesResponse]:
        async def items() -> AsyncIterator[BulkItem]:
            async for message in request_iterator:
                header = _header(message.header) if message.HasField("header") else None
                yield BulkItem(message.request_id, header, message.content)

        try:
            async for outcome in bulk_upload(
                self._domain, items(), concurrency=self._bulk_concurrency
            ):
                reply = storage_pb2.BulkUploadImagesResponse(request_id=outcome.request_id)
                if outcome.record is not None:
                    reply.image.CopyFrom(image_proto(outcome.record))
                    reply.outcome = (
                        storage_pb2.UPLOAD_OUTCOME_DUPLICATE
                        if outcome.duplicate
                        else storage_pb2.UPLOAD_OUTCOME_STORED
                    )
                else:
                    error = outcome.error or ImageMeshError("unknown failure")
                    reply.outcome = storage_pb2.UPLOAD_OUTCOME_REJECTED
                    reply.error.CopyFrom(
                        common_pb2.ItemError(
                            code=error.code_name, reason=error.reason, message=error.message
                        )
                    )
                yield reply
        except ImageMeshError as exc:
            await abort_with(context, exc)

    async def DownloadImage(
        self, request: storage_pb2.DownloadImageRequest, context: _Context
    ) -> AsyncIterator[storage_pb2.DownloadImageResponse]:
        try:
            record, chunks = await self._domain.download(
                request.name, request.offset, request.length
            )
            position = request.offset
            first = True
            async for chunk in chunks:
                reply = storage_pb2.DownloadImageResponse(chunk=chunk, offset=position)
                if first:
                    reply.image.CopyFrom(image_proto(record))
                    first = False
                position += len(chunk)
                yield reply
            if first:  # an empty range still tells the client what the image is
                yield storage_pb2.DownloadImageResponse(image=image_proto(record), offset=position)
        except ImageMeshError as exc:
            await abort_with(context, exc)

    async def GetImage(
        self, request: storage_pb2.GetImageRequest, context: _Context
    ) -> storage_pb2.GetImageResponse:
        try:
            record = await self._domain.get_image(request.name)
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.GetImageResponse(image=image_proto(record))

    async def ListImages(
        self, request: storage_pb2.ListImagesRequest, context: _Context
    ) -> storage_pb2.ListImagesResponse:
        try:
            records, token = await self._domain.list_images(
                request.dataset, request.page_size, request.page_token
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.ListImagesResponse(
            images=[image_proto(r) for r in records], next_page_token=token
        )

    async def DeleteImage(
        self, request: storage_pb2.DeleteImageRequest, context: _Context
    ) -> storage_pb2.DeleteImageResponse:
        try:
            count = await self._domain.delete_image(request.name)
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.DeleteImageResponse(deleted_array_count=count)

    async def PutArray(
        self, request: storage_pb2.PutArrayRequest, context: _Context
    ) -> storage_pb2.PutArrayResponse:
        try:
            info = await self._domain.put_array(
                request.name,
                request.npy_content,
                request.expected_dtype,
                list(request.expected_shape),
                request.image,
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.PutArrayResponse(array=_array_proto(info))

    async def GetArray(
        self, request: storage_pb2.GetArrayRequest, context: _Context
    ) -> storage_pb2.GetArrayResponse:
        try:
            info, content = await self._domain.get_array(request.name)
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.GetArrayResponse(array=_array_proto(info), npy_content=content)

    async def ListArrays(
        self, request: storage_pb2.ListArraysRequest, context: _Context
    ) -> storage_pb2.ListArraysResponse:
        try:
            arrays, token = await self._domain.list_arrays(
                request.prefix, request.page_size, request.page_token
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.ListArraysResponse(
            arrays=[_array_proto(a) for a in arrays], next_page_token=token
        )

    async def DeleteArray(
        self, request: storage_pb2.DeleteArrayRequest, context: _Context
    ) -> storage_pb2.DeleteArrayResponse:
        try:
            await self._domain.delete_array(request.name)
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return storage_pb2.DeleteArrayResponse()
