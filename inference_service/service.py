"""The inference domain: classify one image, list and select model versions. No transport here.

A classification picks its model version first (it fixes the input size), decodes the image for
it, queues it on that version's micro-batcher, and ranks the classes. Stored images come from an
`ImageSource`; persisted predictions go to a `PredictionSink` (both reached over gRPC in the
mesh, see `remote`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import re
import time
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import numpy as np

from imagemesh.errors import InvalidArgument
from imagemesh.names import image_sha256, parse_model_version
from imagemesh.page_tokens import PageTokenCodec

from .batcher import BatchResult, Preprocess
from .decode import ImageLimits, decode_image
from .model.artifact import ModelMetadata
from .serving import ModelManager, ServedModel

__all__ = [
    "ClassScore",
    "Classification",
    "ClassifyInput",
    "ImageSource",
    "InferenceDomain",
    "Pending",
    "PredictionSink",
    "VersionListing",
    "prediction_array_name",
]

DEFAULT_TOP_K = 5
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# Payloads up to this size are decoded on the compute thread as part of their batch (see
# `batcher`: there it costs the event loop nothing, and the loop is what limits the throughput of
# many small calls). Larger ones are decoded on the decode pool before they queue: a big photo
# takes tens of milliseconds to decode, which would hold up the whole batch, or on the event
# loop every other call.
_BATCH_DECODE_BYTES = 64 * 1024
_MODEL = re.compile(r"models/([a-z0-9][a-z0-9._-]{0,62})")


class ImageSource(Protocol):
    """Where stored images' bytes come from."""

    async def fetch(self, name: str, *, max_bytes: int, timeout_s: float | None) -> bytes:
        """The bytes of `images/{sha256}`; `NotFound`, `Unavailable`, or `InvalidArgument`
        if larger than `max_bytes`."""


class PredictionSink(Protocol):
    """Where persisted predictions go."""

    async def record(
        self,
        image: str,
        array_name: str,
        metadata: ModelMetadata,
        probabilities: np.ndarray,
        top_classes: Sequence[ClassScore],
        timeout_s: float | None,
    ) -> None:
        """Stores the probabilities as `.npy` at `array_name` and indexes the prediction."""


@dataclass(frozen=True)
class ClassScore:
    """One class and its probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class ClassifyInput:
    """One image to classify: exactly one of `content` and `image_name`."""

    content: bytes | None = None
    image_name: str | None = None
    model_version: str = ""
    top_k: int = 0
    persist: bool = False


@dataclass(frozen=True)
class Classification:
    """What the model said about one image."""

    model_version: str
    top_classes: list[ClassScore]
    probabilities: np.ndarray
    queue_delay_s: float
    batch_size: int
    probabilities_array: str = ""


@dataclass(frozen=True)
class VersionListing:
    """A page of model versions, newest first, and which one serves."""

    versions: list[ModelMetadata]
    serving: str
    next_page_token: str


def prediction_array_name(metadata: ModelMetadata, sha256: str) -> str:
    """Where an image's persisted probabilities are stored: one array per (version, image)."""
    return f"arrays/predictions/{metadata.model}/{metadata.version}/{sha256}.npy"


# Up to this many classes, `_rank` sorts in Python rather than numpy. Measured (top 5, right
# after the CPU's caches were emptied, what a lone call sees; then again warm): 5 classes
# 60-78 us against 97-123 us for numpy's argsort, whose dispatch touches more code (warm 11
# against 15); 64 classes 76 against 110 (warm 16 against 17); 128 classes 90 against 119 but
# warm 23 against 21; 1,000 classes 263 against 201 (warm 139 against 75).
_PYTHON_SORT_CLASSES = 64


def _rank(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[ClassScore]:
    # Stable sorts: equal probabilities keep the model's class order (`sorted` stays stable
    # with `reverse`). Plain Python numbers from `tolist` (indexing numpy scalars one by one
    # costs twice as much per call).
    values = probabilities.tolist()
    if len(values) <= _PYTHON_SORT_CLASSES:
        order = sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
    else:
        order = np.argsort(-probabilities, kind="stable")[:k].tolist()
    return [ClassScore(i, class_names[i], values[i]) for i in order]


@dataclass(frozen=True)
class Pending:
    """An image queued by `InferenceDomain.queue_blocking`, not classified yet."""

    future: Future[BatchResult]
    metadata: ModelMetadata
    k: int


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _checked(request: ClassifyInput) -> str | None:
    """Refuses a malformed request before any work; the stored image's sha256, if named."""
    if request.content is None and request.image_name is None:
        raise InvalidArgument(
            "no image: set content (the image's bytes) or image_name (images/{sha256})",
            reason="MISSING_IMAGE",
            field="image",
        )
    sha256 = None
    if request.image_name is not None:
        sha256 = image_sha256(request.image_name, field="image_name")
    elif request.persist:
        raise InvalidArgument(
            "persist needs a stored image: send image_name, or upload the image first",
            reason="PERSIST_NEEDS_STORED_IMAGE",
            field="persist",
        )
    if request.model_version:
        parse_model_version(request.model_version)
    if request.top_k < 0:
        raise InvalidArgument(
            f"top_k must be 0 (the default, 5) or more, got {request.top_k}",
            reason="INVALID_TOP_K",
            field="top_k",
        )
    return sha256


def _sent_content(request: ClassifyInput) -> bytes:
    """The checked request's image bytes (the blocking paths take no stored image)."""
    _checked(request)
    if request.content is None:
        raise ValueError("a stored image is classified through InferenceDomain.classify")
    return request.content


def _top_k(request: ClassifyInput, metadata: ModelMetadata) -> int:
    classes = len(metadata.class_names)
    if request.top_k > classes:
        raise InvalidArgument(
            f"top_k is {request.top_k} but {metadata.name} has {classes} classes",
            reason="INVALID_TOP_K",
            field="top_k",
        )
    return request.top_k or min(DEFAULT_TOP_K, classes)


def _classification(metadata: ModelMetadata, result: BatchResult, k: int) -> Classification:
    probabilities = result.output.astype(np.float32, copy=False)
    return Classification(
        model_version=metadata.name,
        top_classes=_rank(probabilities, metadata.class_names, k),
        probabilities=probabilities,
        queue_delay_s=result.queue_delay_s,
        batch_size=result.batch_size,
    )


class InferenceDomain:
    """The service's behaviour, independent of gRPC."""

    def __init__(
        self,
        manager: ModelManager,
        images: ImageSource,
        sink: PredictionSink,
        limits: ImageLimits,
        decode_executor: Executor,
        page_tokens: PageTokenCodec,
    ) -> None:
        self.manager = manager
        self._images = images
        self._sink = sink
        self._limits = limits
        self._decode_executor = decode_executor
        self._tokens = page_tokens

    async def classify(self, request: ClassifyInput, *, timeout_s: float | None) -> Classification:
        """Classifies one image; `timeout_s` is what is left of the caller's deadline."""
        # The batcher's clock (`time.monotonic`, also the event loop's).
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        sha256 = _checked(request)
        served = await self.manager.acquire(request.model_version)
        try:
            metadata = served.metadata
            k = _top_k(request, metadata)
            content = request.content
            field = "content"
            if content is None:
                assert request.image_name is not None
                content = await self._images.fetch(
                    request.image_name,
                    max_bytes=self._limits.max_image_bytes,
                    timeout_s=_left(deadline),
                )
                field = "image_name"
            image = await self._decode(
                content, (metadata.input_height, metadata.input_width), field
            )
            result = await served.batcher.submit(image, deadline=deadline)
        finally:
            self.manager.release(served)
        classification = _classification(metadata, result, k)
        if request.persist:
            assert request.image_name is not None
            assert sha256 is not None
            array_name = prediction_array_name(metadata, sha256)
            await self._sink.record(
                request.image_name,
                array_name,
                metadata,
                classification.probabilities,
                classification.top_classes,
                _left(deadline),
            )
            classification = dataclasses.replace(classification, probabilities_array=array_name)
        return classification

    def classify_blocking(
        self, request: ClassifyInput, *, timeout_s: float | None
    ) -> Classification:
        """`classify` for a caller waiting on its own thread (the synchronous front's), for an
        image sent in the request (stored images go through `classify`, on the event loop).

        When the model is idle the image is computed right on the caller's thread (see
        `MicroBatcher.submit_blocking`).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        served, k, image = self._acquire_sent(request)
        try:
            result = served.batcher.submit_blocking(image, deadline=deadline)
        finally:
            self.manager.release(served)
        return _classification(served.metadata, result, k)

    def queue_blocking(self, request: ClassifyInput, *, timeout_s: float | None) -> Pending:
        """Queues an image sent in the request without waiting for it, from a thread other
        than the event loop's (a stream's reader); `finish` turns it into its classification
        (on the thread that answers, not on the compute thread that computed it)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        served, k, image = self._acquire_sent(request)
        try:
            future = served.batcher.submit_future(image, deadline=deadline)
        except BaseException:
            self.manager.release(served)
            raise
        future.add_done_callback(lambda _: self.manager.release(served))
        return Pending(future, served.metadata, k)

    def _acquire_sent(
        self, request: ClassifyInput
    ) -> tuple[ServedModel, int, np.ndarray | Preprocess]:
        """For the blocking paths: the checked request's version (acquired: the caller
        releases it), its top-k, and its image (or the step that decodes it)."""
        content = _sent_content(request)
        served = self.manager.acquire_blocking(request.model_version)
        try:
            metadata = served.metadata
            return served, _top_k(request, metadata), self._decode_blocking(content, metadata)
        except BaseException:
            self.manager.release(served)
            raise

    @staticmethod
    def finish(pending: Pending) -> Classification:
        """The classification of a queued image, once computed (raises what its batch did)."""
        return _classification(pending.metadata, pending.future.result(), pending.k)

    def _decode_blocking(self, content: bytes, metadata: ModelMetadata) -> np.ndarray | Preprocess:
        """As `_decode`, on the calling thread (already not the event loop's)."""
        size = (metadata.input_height, metadata.input_width)
        if len(content) <= _BATCH_DECODE_BYTES:
            return functools.partial(decode_image, content, size, self._limits, field="content")
        return decode_image(content, size, self._limits, field="content")

    async def _decode(
        self, content: bytes, size: tuple[int, int], field: str
    ) -> np.ndarray | Preprocess:
        """The image's pixels, or (a small image) the step that decodes it in its batch."""
        if len(content) <= _BATCH_DECODE_BYTES:
            return functools.partial(decode_image, content, size, self._limits, field=field)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._decode_executor, lambda: decode_image(content, size, self._limits, field=field)
        )

    async def list_versions(self, model: str, page_size: int, page_token: str) -> VersionListing:
        """A page of published versions (of `models/{model}`, or of all models), newest first."""
        model_id: str | None = None
        if model:
            match = _MODEL.fullmatch(model)
            if match is None:
                raise InvalidArgument(
                    f"model must be models/{{model}} (1-63 of [a-z0-9._-]), got {model[:100]!r}",
                    reason="INVALID_MODEL_NAME",
                    field="model",
                )
            model_id = match.group(1)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0 (default {DEFAULT_PAGE_SIZE}) to {MAX_PAGE_SIZE}, "
                f"got {page_size}",
                reason="INVALID_PAGE_SIZE",
                field="page_size",
            )
        size = page_size or DEFAULT_PAGE_SIZE
        query = f"models:{model}"
        versions = await asyncio.to_thread(self.manager.registry.list_versions, model_id)
        if page_token:
            position = self._tokens.decode(page_token, query=query)
            after = (datetime.fromisoformat(str(position["t"])), str(position["n"]))
            # Keyset pagination: versions published between pages do not shift later pages.
            versions = [v for v in versions if (v.create_time, v.name) < after]
        page = versions[:size]
        token = ""
        if len(versions) > size:
            last = page[-1]
            token = self._tokens.encode(
                {"t": last.create_time.isoformat(), "n": last.name}, query=query
            )
        serving = self.manager.serving
        return VersionListing(page, serving.name if serving else "", token)

    async def select(self, name: str) -> tuple[ModelMetadata, str]:
        """Serves version `name` from now on; returns it and the previous version's name."""
        parse_model_version(name, field="name")
        return await self.manager.select(name)
