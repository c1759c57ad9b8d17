"""The trainer's heavy stages, in process or on Spark, with the same per-partition code.

- `inspect_*`: the per-image half of cleaning (read, verify, decode, hash pixels).
- `extract_*`: backbone features of images not yet cached, written as shards to the cache.

On Spark the driver only ships image hashes; each task reads its images from the object store
itself and writes its feature shard there, so no pixels and no features cross the driver. The
object store and the backbone are cached per Python worker (`imagemesh.spark.worker`) and
outlive tasks and jobs; the backbone is loaded from the weights stored under its identity, so
every worker runs exactly the network the driver publishes. TensorFlow is imported inside
the task functions only (Spark forks its workers; TensorFlow is not fork-safe).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from imagemesh.config import StorageSettings

from .clean import Inspected, inspect_image, inspect_images
from .features import BackboneSpec, Extractor, FeatureCache, FeatureStore, load_backbone
from .images import ImageReader, LabelledImage, UndecodableImage, decode_pixels, image_key

__all__ = [
    "extract_local",
    "extract_spark",
    "inspect_local",
    "inspect_spark",
    "read_pixels",
]

Progress = Callable[[int], None]


def read_pixels(
    store: ImageReader, shas: Sequence[str], size: tuple[int, int], *, io_threads: int = 8
) -> np.ndarray:
    """uint8 (n, h, w, 3) pixels of the images, read in threads; raises if one is unreadable."""

    def read(sha: str) -> np.ndarray:
        return decode_pixels(store.get_bytes(image_key(sha)), size)

    height, width = size
    if not shas:
        return np.zeros((0, height, width, 3), dtype=np.uint8)
    with ThreadPoolExecutor(io_threads) as pool:
        return np.stack(list(pool.map(read, shas)))


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- in process -----------------------------------------------------------------------------


def inspect_local(
    store: ImageReader,
    records: Sequence[LabelledImage],
    size: tuple[int, int],
    progress: Progress | None = None,
    chunk: int = 1024,
) -> list[Inspected]:
    """The cleaning inspection of every image, in this process."""
    result: list[Inspected] = []
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        result.extend(inspect_images(store, part, size))
        if progress:
            progress(len(part))
    return result


def extract_local(
    store: FeatureStore,
    spec: BackboneSpec,
    shas: Sequence[str],
    *,
    shard_images: int = 256,
    batch_size: int = 256,
    progress: Progress | None = None,
    extractor: Extractor | None = None,
) -> int:
    """Extracts and caches the features of `shas` in this process; returns how many."""
    if not shas:
        return 0
    extractor = extractor or Extractor(load_backbone(store, spec), batch_size)
    cache = FeatureCache(store, spec.identity)
    for part in _chunks(shas, shard_images):
        pixels = read_pixels(store, part, spec.input_size)
        cache.write_shard(list(part), extractor.features(pixels))
        if progress:
            progress(len(part))
    return len(shas)


# --- on Spark -------------------------------------------------------------------------------


def _worker_store(storage: StorageSettings) -> Any:
    from inference_service.batch.predictor import open_store_cached

    return open_store_cached(storage)


def _worker_extractor(storage: StorageSettings, spec: BackboneSpec, batch_size: int) -> Extractor:
    from imagemesh.spark.worker import (
        configure_tensorflow,
        freeze_worker_heap,
        task_cores,
        worker_cached,
    )

    def build() -> Extractor:
        configure_tensorflow(task_cores(), 1)
        extractor = Extractor(load_backbone(_worker_store(storage), spec), batch_size)
        height, width = spec.input_size
        # Traced once, and run once at the batch size the tasks use: the first full batch
        # also sets up its kernels and memory, which would otherwise land in the first task.
        extractor.features(np.zeros((batch_size, height, width, 3), dtype=np.uint8))
        # pyspark's per-task `gc.collect()` over TensorFlow's objects cost ~0.28 s per task
        # next to ~0.4 s of extraction (0.27-0.6 of in-process throughput); see the helper.
        freeze_worker_heap()
        return extractor

    key = ("trainer-extractor", spec, storage.model_dump_json(), batch_size)
    return worker_cached(key, build)


def _inspect_partition(
    storage: StorageSettings, size: tuple[int, int], rows: Iterator[tuple[str, str]]
) -> Iterator[tuple[str, str, str, str]]:
    store = _worker_store(storage)
    records = [LabelledImage(sha, label) for sha, label in rows]
    with ThreadPoolExecutor(8) as pool:
        for item in pool.map(lambda r: inspect_image(store, r, size), records):
            yield (item.sha256, item.label, item.pixel_hash, item.problem)


def _extract_partition(
    storage: StorageSettings,
    spec: BackboneSpec,
    batch_size: int,
    shard_images: int,
    shas: Iterator[str],
) -> Iterator[int]:
    """Extracts a partition batch by batch and caches it in shards; yields each shard's count.

    The images of the next batches are read and decoded in threads while the backbone runs on
    the current one (at most `_READ_AHEAD` batches ahead, so memory stays bounded whatever the
    partition's size): the object store's latency and the PNG decoding hide behind extraction.
    Batches are small because on the one core a task owns a batch of 64-256 runs at the same
    rate per image, and a partition of a single shard still overlaps its reads.
    """
    store = _worker_store(storage)
    part = list(shas)
    if not part:
        return
    extractor = _worker_extractor(storage, spec, batch_size)
    cache = FeatureCache(store, spec.identity)

    def read(sha: str) -> np.ndarray | None:
        try:
            return decode_pixels(store.get_bytes(image_key(sha)), spec.input_size)
        except UndecodableImage:
            return None

    done_shas: list[str] = []
    done_features: list[np.ndarray] = []

    def flush() -> int:
        if done_shas:
            cache.write_shard(done_shas, np.concatenate(done_features))
        count = len(done_shas)
        done_shas.clear()
        done_features.clear()
        return count

    with ThreadPoolExecutor(8) as pool:
        batches = iter(_chunks(part, batch_size))
        pending: deque[tuple[Sequence[str], list[Future[np.ndarray | None]]]] = deque()
        while True:
            while len(pending) <= _READ_AHEAD:
                batch = next(batches, None)
                if batch is None:
                    break
                pending.append((batch, [pool.submit(read, sha) for sha in batch]))
            if not pending:
                break
            batch, reads = pending.popleft()
            decoded = [read.result() for read in reads]
            good = [(sha, px) for sha, px in zip(batch, decoded, strict=True) if px is not None]
            if good:
                done_shas.extend(sha for sha, _ in good)
                done_features.append(extractor.features(np.stack([px for _, px in good])))
            if len(done_shas) >= shard_images:
                yield flush()
        yield flush()


# Batches read ahead of the one being extracted in a task.
_READ_AHEAD = 2


def _partitions(count: int, per_partition: int, slots: int) -> int:
    """At most `per_partition` items a partition, in a whole number of waves over the slots.

    A last wave with fewer tasks than slots leaves cores idle at the end of the job (2,500
    images in 3 tasks of 1,024 on 2 slots: a third of the job on one core); rounding up to a
    multiple of the slots keeps every core busy to the end.
    """
    slots = max(1, slots)
    waves = math.ceil(math.ceil(count / per_partition) / slots)
    return max(1, min(count, waves * slots))


def inspect_spark(
    context: Any,
    storage: StorageSettings,
    records: Sequence[LabelledImage],
    size: tuple[int, int],
    *,
    partition_images: int = 2048,
) -> list[Inspected]:
    """The cleaning inspection of every image, on the Spark application of `context`."""
    if not records:
        return []
    rows = [(r.sha256, r.label) for r in records]
    slices = _partitions(len(rows), partition_images, int(context.defaultParallelism))
    context.setJobGroup("trainer-clean", "trainer: inspect images", interruptOnCancel=True)
    found = (
        context.parallelize(rows, slices)
        .mapPartitions(partial(_inspect_partition, storage, size))
        .collect()
    )
    return [Inspected(*row) for row in found]


def extract_spark(
    context: Any,
    storage: StorageSettings,
    spec: BackboneSpec,
    shas: Sequence[str],
    *,
    partition_images: int = 1024,
    batch_size: int = 128,
    shard_images: int = 256,
) -> int:
    """Extracts and caches the features of `shas` on Spark; returns how many were written.

    Each task extracts its partition `batch_size` images at a time, reads overlapped with
    extraction, and caches shards of about `shard_images`. Partitions are long (~1.5 s of
    extraction on one core) so that the per-task cost (~20-60 ms of scheduling) stays small.
    """
    if not shas:
        return 0
    slices = _partitions(len(shas), partition_images, int(context.defaultParallelism))
    context.setJobGroup("trainer-extract", "trainer: extract features", interruptOnCancel=True)
    counts = (
        context.parallelize(list(shas), slices)
        .mapPartitions(partial(_extract_partition, storage, spec, batch_size, shard_images))
        .collect()
    )
    return int(sum(counts))
