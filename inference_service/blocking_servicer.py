"""Classify and ClassifyStream on grpc's synchronous server (`imagemesh.front`).

The same contract as `servicer`, served from the front's handler threads: an image sent in the
request goes straight to the domain's blocking path (a lone call is computed on the handler's
own thread, see `MicroBatcher.submit_blocking`); a stored image, which needs the storage and
search clients of the service's event loop, is classified there, the handler waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from imagemesh.errors import FailedPrecondition, ImageMeshError, Unavailable
from imagemesh.front import time_remaining
from imagemesh.inference.v1 import inference_pb2
from imagemesh.interceptors import in_this_request
from imagemesh.status import abort_blocking

from .service import Classification, InferenceDomain
from .servicer import STREAM_WINDOW, InferenceServicer, classify_input, item_error, response_of
from .serving import no_model_message

__all__ = ["BlockingInference"]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# How often a stream's reader, waiting for room in its window, looks whether the call ended.
_READER_POLL_S = 0.1


@dataclass(frozen=True)
class _Answer:
    item: inference_pb2.ClassifyStreamRequest
    # Returns the item's classification, or raises why there is none.
    finish: Callable[[], Classification]


@dataclass(frozen=True)
class _ReadingEnded:
    items: int
    error: BaseException | None


class BlockingInference:
    """The blocking handlers of the InferenceService's hot methods, over its servicer's
    domain (bound when the service starts)."""

    def __init__(self, servicer: InferenceServicer) -> None:
        self._servicer = servicer

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """Method handlers by full method name, for the front."""
        prefix = "/imagemesh.inference.v1.InferenceService/"
        return {
            prefix + "Classify": grpc.unary_unary_rpc_method_handler(
                self.classify,
                request_deserializer=inference_pb2.ClassifyRequest.FromString,
                response_serializer=inference_pb2.ClassifyResponse.SerializeToString,
            ),
            prefix + "ClassifyStream": grpc.stream_stream_rpc_method_handler(
                self.classify_stream,
                request_deserializer=inference_pb2.ClassifyStreamRequest.FromString,
                response_serializer=inference_pb2.ClassifyStreamResponse.SerializeToString,
            ),
        }

    def _domain(self, context: grpc.ServicerContext) -> InferenceDomain:
        domain: InferenceDomain | None = getattr(self._servicer, "domain", None)
        if domain is None:
            abort_blocking(
                context,
                Unavailable(
                    "the inference service is starting (loading its model); retry shortly",
                    retry_after_s=1.0,
                ),
            )
        return domain

    def _on_loop(self, work: Coroutine[Any, Any, _T]) -> Future[_T]:
        """Runs `work` on the service's event loop, as part of the current request."""
        return asyncio.run_coroutine_threadsafe(in_this_request(work), self._servicer.loop)

    def classify(
        self, request: inference_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ClassifyResponse:
        """Classifies one image."""
        domain = self._domain(context)
        wanted = classify_input(request)
        timeout_s = time_remaining(context)
        try:
            if wanted.image_name is None:
                result = domain.classify_blocking(wanted, timeout_s=timeout_s)
            else:
                done = self._on_loop(domain.classify(wanted, timeout_s=timeout_s))
                context.add_callback(lambda: _cancel(done))
                result = done.result()
        except ImageMeshError as error:
            abort_blocking(context, error)
        return response_of(result, request)

    def classify_stream(
        self,
        requests: Iterator[inference_pb2.ClassifyStreamRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[inference_pb2.ClassifyStreamResponse]:
        """Classifies a stream of images, answering each as soon as it is done.

        A reader thread takes the requests and queues their images (at most `STREAM_WINDOW`
        unanswered: a fast producer is slowed down by HTTP/2 flow control instead); the
        handler's thread turns each computed image into its answer and sends it.
        """
        domain = self._domain(context)
        if domain.manager.serving is None:
            abort_blocking(
                context,
                FailedPrecondition(no_model_message(domain.manager.model), reason="NO_MODEL"),
            )
        answers: queue.SimpleQueue[_Answer | _ReadingEnded] = queue.SimpleQueue()
        window = threading.Semaphore(STREAM_WINDOW)
        ended = threading.Event()
        unanswered: set[Future[Any]] = set()
        guard = threading.Lock()

        def track(future: Future[Any]) -> None:
            with guard:
                unanswered.add(future)

            def done(finished: Future[Any]) -> None:
                with guard:
                    unanswered.discard(finished)

            future.add_done_callback(done)

        def read() -> None:
            count, failure = 0, None
            try:
                for item in requests:
                    while not window.acquire(timeout=_READER_POLL_S):
                        if ended.is_set():
                            return
                    if ended.is_set():
                        return
                    count += 1
                    self._begin(domain, item, context, answers, track)
            except BaseException as exc:  # the request stream failed: so does the call
                failure = exc
            finally:
                answers.put(_ReadingEnded(count, failure))

        threading.Thread(target=read, name="imagemesh-stream-reader", daemon=True).start()
        try:
            sent, expected = 0, None
            while expected is None or sent < expected:
                message = answers.get()
                if isinstance(message, _ReadingEnded):
                    if message.error is not None:
                        raise message.error
                    expected = message.items
                    continue
                window.release()
                sent += 1
                yield _reply(message)
        finally:
            ended.set()
            with guard:
                left = list(unanswered)
            for future in left:  # images not computing yet are dropped (see MicroBatcher)
                future.cancel()  # (runs its callbacks here: not under `guard`)

    def _begin(
        self,
        domain: InferenceDomain,
        item: inference_pb2.ClassifyStreamRequest,
        context: grpc.ServicerContext,
        answers: queue.SimpleQueue[_Answer | _ReadingEnded],
        track: Callable[[Future[Any]], None],
    ) -> None:
        """Starts one stream item; its answer is queued when it is done."""
        wanted = classify_input(item.request)
        timeout_s = time_remaining(context)
        try:
            if wanted.image_name is None:
                pending = domain.queue_blocking(wanted, timeout_s=timeout_s)
                future: Future[Any] = pending.future
                finish: Callable[[], Classification] = lambda: domain.finish(pending)  # noqa: E731
            else:
                stored = self._on_loop(domain.classify(wanted, timeout_s=timeout_s))
                future, finish = stored, stored.result
        except Exception as error:  # refused before any work: that is its answer
            answers.put(_Answer(item, _raiser(error)))
            return
        track(future)
        future.add_done_callback(lambda _: answers.put(_Answer(item, finish)))


def _cancel(work: Future[Any]) -> None:
    """The call ended: its work is not wanted any more."""
    work.cancel()


def _raiser(error: Exception) -> Callable[[], Classification]:
    def finish() -> Classification:
        raise error

    return finish


def _reply(answer: _Answer) -> inference_pb2.ClassifyStreamResponse:
    item = answer.item
    try:
        result = answer.finish()
    except Exception as error:  # one image's failure is its answer, not the stream's
        if not isinstance(error, ImageMeshError):
            _log.error("classifying stream item %s failed", item.request_id, exc_info=error)
        return inference_pb2.ClassifyStreamResponse(
            request_id=item.request_id, error=item_error(error)
        )
    return inference_pb2.ClassifyStreamResponse(
        request_id=item.request_id, response=response_of(result, item.request)
    )
