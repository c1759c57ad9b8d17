"""The InferenceService gRPC servicer: proto in, domain call, proto out, errors mapped.

Batch-job RPCs (BatchClassify, Get/List/Cancel/WatchBatchJob) are served by `batch.servicer`
(the mount combines both). On the synchronous front, Classify and ClassifyStream are served by
`blocking_servicer` instead, with the helpers here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2

from imagemesh.common.v1 import common_pb2
from imagemesh.errors import FailedPrecondition, ImageMeshError
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.status import abort_with

from .model.artifact import ModelMetadata
from .service import Classification, ClassifyInput, InferenceDomain
from .serving import no_model_message

__all__ = [
    "STREAM_WINDOW",
    "InferenceServicer",
    "classify_input",
    "item_error",
    "model_version_proto",
    "response_of",
]

_log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

# Images of one stream being classified at once: enough to fill the largest batches, small
# enough that a fast producer is slowed down (HTTP/2 flow control) instead of queueing without
# bound.
STREAM_WINDOW = 256


def model_version_proto(metadata: ModelMetadata, *, serving: bool) -> inference_pb2.ModelVersion:
    """The contract's view of a version."""
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(metadata.create_time)
    return inference_pb2.ModelVersion(
        name=metadata.name,
        class_names=list(metadata.class_names),
        input_height=metadata.input_height,
        input_width=metadata.input_width,
        architecture=metadata.architecture,
        backbone_weights=metadata.backbone_weights,
        preprocessing=metadata.preprocessing,
        metrics=dict(metadata.metrics),
        create_time=created,
        serving=serving,
    )


def classify_input(request: inference_pb2.ClassifyRequest) -> ClassifyInput:
    which = request.WhichOneof("image")
    return ClassifyInput(
        content=request.content if which == "content" else None,
        image_name=request.image_name if which == "image_name" else None,
        model_version=request.model_version,
        top_k=request.top_k,
        persist=request.persist,
    )


def response_of(
    result: Classification, request: inference_pb2.ClassifyRequest
) -> inference_pb2.ClassifyResponse:
    # Filled in place (`add`, `FromNanoseconds` on the field): half the time of building the
    # messages as keyword arguments, on the event loop that many small calls wait for.
    response = inference_pb2.ClassifyResponse(
        model_version=result.model_version,
        probabilities_array=result.probabilities_array,
        batch_size=result.batch_size,
    )
    response.queue_delay.FromNanoseconds(int(result.queue_delay_s * 1e9))
    add = response.top_classes.add
    for c in result.top_classes:
        add(class_name=c.name, class_index=c.index, probability=c.probability)
    if request.include_probabilities:
        response.probabilities.extend(result.probabilities.tolist())
    return response


def item_error(error: BaseException) -> common_pb2.ItemError:
    if isinstance(error, ImageMeshError):
        return common_pb2.ItemError(
            code=error.code_name, reason=error.reason, message=error.message
        )
    return common_pb2.ItemError(
        code="INTERNAL", reason="INTERNAL", message=f"{type(error).__name__}: {error}"
    )


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Classify, ClassifyStream, ListModelVersions and SelectModelVersion."""

    domain: InferenceDomain
    # The event loop the domain runs on (the blocking front hands stored images to it).
    loop: asyncio.AbstractEventLoop

    def bind(self, domain: InferenceDomain) -> None:
        """Attaches the domain (the servicer is created before the mount starts); called on
        the service's event loop."""
        self.loop = asyncio.get_running_loop()
        self.domain = domain

    async def Classify(
        self, request: inference_pb2.ClassifyRequest, context: Context
    ) -> inference_pb2.ClassifyResponse:
        """Classifies one image."""
        try:
            result = await self.domain.classify(
                classify_input(request), timeout_s=context.time_remaining()
            )
        except ImageMeshError as error:
            await abort_with(context, error)
        return response_of(result, request)

    async def ClassifyStream(
        self,
        request_iterator: AsyncIterator[inference_pb2.ClassifyStreamRequest],
        context: Context,
    ) -> AsyncIterator[inference_pb2.ClassifyStreamResponse]:
        """Classifies a stream of images, answering each as soon as it is done."""
        if self.domain.manager.serving is None:
            await abort_with(
                context,
                FailedPrecondition(no_model_message(self.domain.manager.model), reason="NO_MODEL"),
            )
        answers: asyncio.Queue[inference_pb2.ClassifyStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: set[asyncio.Task[None]] = set()

        async def answer(item: inference_pb2.ClassifyStreamRequest) -> None:
            try:
                result = await self.domain.classify(
                    classify_input(item.request), timeout_s=context.time_remaining()
                )
                reply = inference_pb2.ClassifyStreamResponse(
                    request_id=item.request_id, response=response_of(result, item.request)
                )
            except Exception as error:  # one image's failure is its answer, not the stream's
                if not isinstance(error, ImageMeshError):
                    _log.exception("classifying stream item %s failed", item.request_id)
                reply = inference_pb2.ClassifyStreamResponse(
                    request_id=item.request_id, error=item_error(error)
                )
            finally:
                window.release()
            await answers.put(reply)

        async def read() -> None:
            try:
                async for item in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(item))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                if pending:
                    await asyncio.gather(*pending)
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # re-raises a failure of the request stream
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    async def ListModelVersions(
        self, request: inference_pb2.ListModelVersionsRequest, context: Context
    ) -> inference_pb2.ListModelVersionsResponse:
        """Lists published versions, newest first."""
        try:
            listing = await self.domain.list_versions(
                request.model, request.page_size, request.page_token
            )
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.ListModelVersionsResponse(
            model_versions=[
                model_version_proto(v, serving=v.name == listing.serving) for v in listing.versions
            ],
            next_page_token=listing.next_page_token,
        )

    async def SelectModelVersion(
        self, request: inference_pb2.SelectModelVersionRequest, context: Context
    ) -> inference_pb2.SelectModelVersionResponse:
        """Loads, warms and serves a version."""
        try:
            metadata, previous = await self.domain.select(request.name)
        except ImageMeshError as error:
            await abort_with(context, error)
        return inference_pb2.SelectModelVersionResponse(
            model_version=model_version_proto(metadata, serving=True),
            previous_model_version=previous,
        )
