"""The other services, as the inference domain needs them, reached over gRPC.

`StorageImages` reads stored images through StorageService.DownloadImage; `SearchPredictions`
writes probabilities through StorageService.PutArray and records the prediction through
SearchService.IndexPredictions. Their gRPC errors come back as domain errors, with messages
that say which service failed.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence

import grpc
import numpy as np
from google.protobuf import timestamp_pb2

from imagemesh.channels import open_channel
from imagemesh.common.v1 import common_pb2
from imagemesh.config import Settings
from imagemesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    ImageMeshError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

from .model.artifact import ModelMetadata
from .service import ClassScore

__all__ = ["LazyChannel", "SearchPredictions", "StorageImages"]


class LazyChannel:
    """A `grpc.aio` channel opened on first use (the mesh's address is known only once bound)."""

    def __init__(self, address: Callable[[], str], settings: Settings) -> None:
        self._address = address
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None

    def get(self) -> grpc.aio.Channel:
        """The channel, opened if needed."""
        if self._channel is None:
            # The deployment's TLS and token, as for any service-to-service call.
            self._channel = open_channel(self._address(), self._settings)
        return self._channel

    @property
    def address(self) -> str:
        """Where the channel goes."""
        return self._address()

    async def close(self) -> None:
        """Closes the channel if it was opened."""
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None


def _to_domain(exc: grpc.aio.AioRpcError, service: str, what: str) -> ImageMeshError:
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{what}: {detail}", reason="IMAGE_NOT_FOUND")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what}: {detail}", reason="INVALID_ARGUMENT")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{what}: the deadline passed while waiting for {service}")
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPrecondition(f"{what}: {detail}")
    return Unavailable(
        f"{what}: the {service} answered {code.name}: {detail}", reason="BACKEND_UNAVAILABLE"
    )


class StorageImages:
    """Stored images, read through StorageService.DownloadImage."""

    def __init__(self, channel: LazyChannel) -> None:
        self._channel = channel

    async def fetch(self, name: str, *, max_bytes: int, timeout_s: float | None) -> bytes:
        """The image's bytes; `InvalidArgument` if it is larger than `max_bytes`."""
        stub = storage_pb2_grpc.StorageServiceStub(self._channel.get())
        buffer = io.BytesIO()
        try:
            call = stub.DownloadImage(
                storage_pb2.DownloadImageRequest(name=name), timeout=timeout_s
            )
            async for message in call:
                if message.image.size_bytes > max_bytes:
                    call.cancel()
                    raise InvalidArgument(
                        f"{name} is {message.image.size_bytes:,} bytes, over this server's limit "
                        f"of {max_bytes:,} bytes",
                        reason="IMAGE_TOO_LARGE",
                        field="image_name",
                    )
                buffer.write(message.chunk)
                if buffer.tell() > max_bytes:
                    call.cancel()
                    raise InvalidArgument(
                        f"{name} is over this server's limit of {max_bytes:,} bytes",
                        reason="IMAGE_TOO_LARGE",
                        field="image_name",
                    )
        except grpc.aio.AioRpcError as exc:
            raise _to_domain(exc, "storage service", f"reading {name}") from None
        return buffer.getvalue()


class SearchPredictions:
    """Persisted predictions: `.npy` through StorageService, the record through SearchService."""

    def __init__(self, storage: LazyChannel, search: LazyChannel) -> None:
        self._storage = storage
        self._search = search

    async def record(
        self,
        image: str,
        array_name: str,
        metadata: ModelMetadata,
        probabilities: np.ndarray,
        top_classes: Sequence[ClassScore],
        timeout_s: float | None,
    ) -> None:
        """Stores the array, then indexes the prediction; on an index failure the array is
        deleted again, so a failed call leaves nothing half-written."""
        buffer = io.BytesIO()
        array = np.ascontiguousarray(probabilities, dtype="<f4")
        np.save(buffer, array, allow_pickle=False)
        storage = storage_pb2_grpc.StorageServiceStub(self._storage.get())
        try:
            await storage.PutArray(
                storage_pb2.PutArrayRequest(
                    name=array_name,
                    npy_content=buffer.getvalue(),
                    expected_dtype="<f4",
                    expected_shape=list(array.shape),
                    image=image,
                ),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise _to_domain(exc, "storage service", f"storing {array_name}") from None
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        prediction = common_pb2.Prediction(
            model_version=metadata.name,
            top_class=top_classes[0].name,
            confidence=top_classes[0].probability,
            top_classes=[
                common_pb2.ClassScore(
                    class_name=c.name, class_index=c.index, probability=c.probability
                )
                for c in top_classes
            ],
            predict_time=now,
            probabilities_array=array_name,
        )
        search = search_pb2_grpc.SearchServiceStub(self._search.get())
        error: ImageMeshError | None = None
        try:
            reply = await search.IndexPredictions(
                search_pb2.IndexPredictionsRequest(
                    predictions=[search_pb2.ImagePrediction(image=image, prediction=prediction)]
                ),
                timeout=timeout_s,
            )
            if reply.errors:
                item = reply.errors[0].error
                error = Unavailable(
                    f"indexing the prediction of {image} failed: {item.code} {item.reason}: "
                    f"{item.message}",
                    reason="INDEX_FAILED",
                )
        except grpc.aio.AioRpcError as exc:
            error = _to_domain(exc, "search service", f"indexing the prediction of {image}")
        if error is not None:
            # Best effort: a retry of the call overwrites the same array anyway.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await storage.DeleteArray(
                    storage_pb2.DeleteArrayRequest(name=array_name), timeout=10
                )
            raise error
