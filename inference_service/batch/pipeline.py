"""Classifying a stream of image names: the one code path of local and Spark jobs.

For each batch of `batch_size` names: read every image from the object store and decode it
(I/O threads), predict the batch in one model call, write one `.npy` of probabilities per image
(and the preprocessed input when asked), then index the batch's predictions in one call. A
store that can write many objects with one flush to disk (the local folder's
`put_bytes_many`) gets the batch's arrays in one call; on S3 they are concurrent PUTs. The
stages overlap: batch i+1 is read while batch i is predicted, and batch i's writes and index
call run while batch i+1 is predicted, so the model waits on I/O as little as possible. At most
three batches are in memory at once (one being read, one predicted, one written), which is what
bounds a worker's memory: batch_size x (encoded + decoded image + probabilities) x 3.

Per-image problems (a missing image, bytes that do not decode, an image the index rejects) are
`ItemFailure`s and the stream goes on. Problems of the whole job (the store or the search service
unreachable after retries) raise, so that Spark retries the task and, if it keeps failing,
fails the job. Every write goes to a deterministic key and every index call is an upsert, so
running the same names again (a retried task) overwrites, never duplicates.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

import numpy as np

from imagemesh.config import Settings, StorageSettings
from imagemesh.errors import ImageMeshError, InvalidArgument, NotFound
from imagemesh.names import image_sha256

from .indexer import PredictionIndexer, PredictionToIndex
from .jobs import MAX_LISTED_FAILURES, ItemFailure
from .keys import (
    array_object_key,
    image_object_key,
    input_array_name,
    prediction_array_name,
)

__all__ = [
    "BlobStore",
    "CancelSignal",
    "JobSpec",
    "Outcome",
    "Predictor",
    "classify_names",
    "describe_error",
]


class BlobStore(Protocol):
    """The part of `storage_service.backends.ObjectStore` the pipeline uses.

    A store that also has `put_bytes_many(objects, content_type)` (`LocalObjectStore`) is
    given each batch's arrays in one call.
    """

    def get_bytes(self, key: str) -> bytes:
        """The object; `imagemesh.errors.NotFound` if absent."""

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = ...,
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Writes `data` as `key`, atomically replacing any previous object."""


class Predictor(Protocol):
    """A model version: pixels (n, h, w, 3) in [0, 255] -> probabilities (n, classes)."""

    model_version: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for every row."""
        ...


@dataclass(frozen=True)
class JobSpec:
    """What a worker needs to run its share of a job (picklable: shipped to Spark workers)."""

    job_id: str
    model_version: str
    storage: StorageSettings
    search_address: str
    store_inputs: bool = False
    top_k: int = 5
    batch_size: int = 64
    io_threads: int = 8
    # An object whose existence asks the job's workers to stop (see `CancelSignal`).
    cancel_key: str = ""
    # The deployment's settings for service-to-service channels (TLS, token); None: plain.
    client: Settings | None = None


@dataclass
class Outcome:
    """What classifying some names did: counts, the first failures, and whether it stopped early."""

    processed: int = 0
    failed: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    stopped: bool = False

    def add_failure(self, failure: ItemFailure) -> None:
        """Counts a failed image, listing it while fewer than 100 are listed."""
        self.failed += 1
        if len(self.failures) < MAX_LISTED_FAILURES:
            self.failures.append(failure)

    def merge(self, other: Outcome) -> Outcome:
        """Adds `other`'s counts and failures to this one; returns self."""
        self.processed += other.processed
        self.failed += other.failed
        room = MAX_LISTED_FAILURES - len(self.failures)
        if room > 0:
            self.failures.extend(other.failures[:room])
        self.stopped = self.stopped or other.stopped
        return self


class CancelSignal:
    """Whether a job's cancel marker exists in the store, checked at most every `every_s`.

    A Spark task cannot see the driver's cancellation flag, and killing its Python worker
    takes seconds; the marker lets every worker stop after the batch in hand, with its
    finished images written, indexed and counted.
    """

    def __init__(self, store: Any, key: str, every_s: float = 0.5) -> None:
        self._store = store
        self._key = key
        self._every_s = every_s
        self._checked = 0.0
        self._set = False

    def __call__(self) -> bool:
        if self._set or not self._key:
            return self._set
        now = time.monotonic()
        if now - self._checked >= self._every_s:
            self._checked = now
            self._set = bool(self._store.exists(self._key))
        return self._set


_NPY = "application/x-npy"


def _chunks(names: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(names)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class _Read:
    name: str
    sha256: str = ""
    pixels: np.ndarray | None = None
    failure: ItemFailure | None = None


class _Pipeline:
    def __init__(
        self,
        spec: JobSpec,
        predictor: Predictor,
        store: BlobStore,
        indexer: PredictionIndexer,
        decode: Callable[[bytes, tuple[int, int]], np.ndarray],
    ) -> None:
        self.spec = spec
        self.predictor = predictor
        self.store = store
        self.indexer = indexer
        self.decode = decode
        self.io = ThreadPoolExecutor(spec.io_threads, thread_name_prefix="batch-io")
        # One thread finishes batches (writes, then index) in order, off the model's path.
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="batch-finish")

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.finisher.shutdown(wait=True)

    def read(self, name: str) -> _Read:
        try:
            sha = image_sha256(name, field="selection")
        except InvalidArgument as exc:
            return _Read(name, failure=ItemFailure(name, exc.code_name, exc.reason, exc.message))
        try:
            data = self.store.get_bytes(image_object_key(sha))
        except NotFound:
            return _Read(
                name,
                sha,
                failure=ItemFailure(
                    name, "NOT_FOUND", "IMAGE_NOT_FOUND", f"{name} is not in the object store"
                ),
            )
        try:
            return _Read(name, sha, pixels=self.decode(data, self.predictor.input_size))
        except InvalidArgument as exc:
            return _Read(
                name, sha, failure=ItemFailure(name, exc.code_name, exc.reason, exc.message)
            )

    def read_slice(self, names: list[str]) -> list[_Read]:
        return [self.read(name) for name in names]

    def read_batch(self, names: list[str]) -> list[Future[list[_Read]]]:
        # One task per I/O thread, each reading a contiguous slice in order: a future per
        # image cost about as much CPU as reading a small image from the local folder.
        step = max(1, -(-len(names) // self.spec.io_threads))
        return [
            self.io.submit(self.read_slice, names[start : start + step])
            for start in range(0, len(names), step)
        ]

    def arrays_of(self, read: _Read, probabilities: np.ndarray) -> list[tuple[str, bytes]]:
        # One object per array, nothing else: no link marker (predictions and inputs sit at
        # the per-version, per-image keys that the storage service's DeleteImage finds by
        # pattern, `DERIVED_PREFIXES`) and no user metadata (dtype and shape are in the
        # `.npy` header, which GetArray reads when metadata is absent; the image is in the
        # key). Measured here: on MinIO each object write is a synchronous write per drive;
        # on the local store metadata is a second file with its own flush and rename.
        version = self.predictor.model_version
        arrays = [
            (
                array_object_key(prediction_array_name(version, read.sha256)),
                _npy_bytes(np.ascontiguousarray(probabilities, "<f4")),
            )
        ]
        if self.spec.store_inputs and read.pixels is not None:
            arrays.append(
                (
                    array_object_key(input_array_name(version, read.sha256)),
                    _npy_bytes(np.ascontiguousarray(read.pixels, "<f4")),
                )
            )
        return arrays

    def write_all(self, objects: list[tuple[str, bytes]]) -> None:
        put_many = getattr(self.store, "put_bytes_many", None)
        if put_many is not None:
            # The local folder writes the batch with one flush to disk (see
            # `LocalObjectStore.put_bytes_many`) instead of one fsync per file.
            put_many(objects, _NPY)
            return
        futures = [self.io.submit(self.store.put_bytes, key, data, _NPY) for key, data in objects]
        for future in futures:
            future.result()

    def finish(self, good: list[_Read], probabilities: np.ndarray, last: bool) -> Outcome:
        outcome = Outcome()
        version = self.predictor.model_version
        objects: list[tuple[str, bytes]] = []
        written: list[PredictionToIndex] = []
        for read, row in zip(good, probabilities, strict=True):
            objects.extend(self.arrays_of(read, row))
            written.append(
                PredictionToIndex(read.name, row, prediction_array_name(version, read.sha256))
            )
        self.write_all(objects)
        rejected = self.indexer.index(
            self.predictor.model_version,
            self.predictor.class_names,
            self.spec.top_k,
            written,
            # The job's last batch waits until searchable: when the job says SUCCEEDED, a
            # search finds every prediction.
            wait_visible=last,
        )
        for failure in rejected:
            outcome.add_failure(failure)
        outcome.processed += len(written) - len(rejected)
        return outcome


def classify_names(
    names: Iterable[str],
    spec: JobSpec,
    predictor: Predictor,
    store: BlobStore,
    indexer: PredictionIndexer,
    *,
    decode: Callable[[bytes, tuple[int, int]], np.ndarray] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[Outcome], None] | None = None,
) -> Outcome:
    """Classifies `names` (see the module docstring); returns what was done.

    `should_stop` is polled between batches; when it turns true, batches already predicted are
    still written and indexed, then the outcome comes back with `stopped` set. `on_progress`
    gets each finished batch's outcome (for live counts).
    """
    if decode is None:
        decode = _default_decoder(spec.storage)
    pipeline = _Pipeline(spec, predictor, store, indexer, decode)
    total = Outcome()
    pending: Future[Outcome] | None = None

    def collect() -> None:
        nonlocal pending
        if pending is not None:
            done = pending.result()
            pending = None
            total.merge(done)
            if on_progress is not None:
                on_progress(done)

    try:
        batches = _chunks(names, spec.batch_size)
        current = next(batches, None)
        reading = pipeline.read_batch(current) if current is not None else []
        while current is not None:
            reads = [read for future in reading for read in future.result()]
            following = next(batches, None)
            stop = should_stop()
            reading = pipeline.read_batch(following) if following is not None and not stop else []
            misses = Outcome()
            for read in reads:
                if read.failure is not None:
                    misses.add_failure(read.failure)
            good = [r for r in reads if r.pixels is not None]
            probabilities = (
                predictor.predict(np.stack([r.pixels for r in good if r.pixels is not None]))
                if good
                else np.empty((0, len(predictor.class_names)), dtype=np.float32)
            )
            collect()
            last = following is None or stop
            pending = pipeline.finisher.submit(pipeline.finish, good, probabilities, last)
            total.merge(misses)
            if on_progress is not None and misses.failed:
                on_progress(misses)
            if stop:
                total.stopped = following is not None
                break
            current = following
        collect()
    finally:
        for future in reading:
            future.cancel()
        pipeline.close()
    return total


def _default_decoder(storage: StorageSettings) -> Callable[[bytes, tuple[int, int]], np.ndarray]:
    from inference_service.decode import ImageLimits, decode_image

    limits = ImageLimits(max_image_pixels=storage.max_image_pixels)

    def decode(data: bytes, size: tuple[int, int]) -> np.ndarray:
        return decode_image(data, size, limits, field="image")

    return decode


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a job-level failure, for `error_message`."""
    if isinstance(exc, ImageMeshError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
