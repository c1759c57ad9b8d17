"""Rebuilds the search index, and compacts the dataset logs, from the object store alone.

The store is the source of truth: every image object carries its full record, so walking
`images/` is enough to (re)index every image through `SearchService.IndexImages`, in
batches, and to rewrite each dataset's membership log without the entries of deleted or
re-uploaded images. Log segments written while this runs are kept, so uploads may go on.

Then the index is pruned: a document whose image is not in the store (its delete never reached
search, or the index was restored from an older snapshot) is removed, so that a reindex leaves
the index equal to the store. A document is removed only if its image object is absent when
checked, so images uploaded during the walk keep theirs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from storage_service.backends import ObjectStore
from storage_service.layout import (
    dataset_log_key,
    dataset_log_prefix,
    image_key,
    record_sidecar_key,
    sha_from_image_key,
)
from storage_service.records import SIDECAR, ImageRecord
from storage_service.search_client import SearchNotifier, image_document

__all__ = ["ReindexReport", "iter_records", "reindex"]

_log = logging.getLogger(__name__)
_LOG_SEGMENT_ENTRIES = 1000
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass
class ReindexReport:
    """What a reindex did."""

    images: int = 0
    indexed: int = 0
    refused: int = 0
    datasets: int = 0
    log_segments_removed: int = 0
    stale_removed: int = 0


def iter_records(store: ObjectStore) -> Iterator[ImageRecord]:
    """Every image record in the store, in key order (skipping foreign objects)."""
    for key in store.list_keys("images/"):
        sha = sha_from_image_key(key)
        if sha is None:
            continue
        info = store.stat(image_key(sha))
        value = info.metadata.get("record") if info is not None else None
        if not value:
            continue
        if value == SIDECAR:
            try:
                yield ImageRecord.from_json(store.get_bytes(record_sidecar_key(sha)))
            except Exception:  # a sidecar lost to a crash: the image is not committed
                _log.warning("image %s has no readable record; skipped", sha)
            continue
        yield ImageRecord.from_inline_metadata(value)


def _keys(store: ObjectStore, prefix: str) -> list[str]:
    return list(store.list_keys(prefix))


async def _index_batch(notifier: SearchNotifier, batch: list[ImageRecord]) -> int:
    delay = 0.5
    for attempt in range(6):
        try:
            return len(await notifier.index([image_document(r) for r in batch]))
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _RETRYABLE or attempt == 5:
                raise
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def _prune(store: ObjectStore, notifier: SearchNotifier, seen: set[str]) -> int:
    def absent(names: list[str]) -> list[str]:
        gone = []
        for name in names:
            sha = name.removeprefix("images/")
            if len(sha) != 64 or store.stat(image_key(sha)) is None:
                gone.append(name)
        return gone

    stale: list[str] = []
    async for names in notifier.indexed_names():
        unseen = [name for name in names if name not in seen]
        if unseen:
            stale.extend(await asyncio.to_thread(absent, unseen))
    # Deleted after the walk: deleting while paging would shift the pages still to read.
    for start in range(0, len(stale), 500):
        await notifier.delete(stale[start : start + 500])
    return len(stale)


async def reindex(
    store: ObjectStore,
    notifier: SearchNotifier,
    *,
    batch_size: int = 500,
    compact_logs: bool = True,
    prune: bool = True,
    progress: Callable[[int], None] = lambda n: None,
) -> ReindexReport:
    """Indexes every stored image, then (with `prune`) removes the documents of images that
    are not stored; returns counts. Raises `grpc.aio.AioRpcError` if search keeps failing
    (after retries of transient errors)."""
    report = ReindexReport()
    seen: set[str] = set()
    members: dict[str, list[tuple[float, str, str]]] = {}
    old_segments: dict[str, list[str]] = {}
    batch: list[ImageRecord] = []
    records = await asyncio.to_thread(lambda: iter(iter_records(store)))
    while True:
        record = await asyncio.to_thread(next, records, None)
        if record is not None:
            report.images += 1
            seen.add(record.name)
            batch.append(record)
            members.setdefault(record.dataset, []).append(
                (record.create_time.timestamp(), record.sha256, record.generation)
            )
        if batch and (record is None or len(batch) >= batch_size):
            report.refused += await _index_batch(notifier, batch)
            report.indexed += len(batch)
            progress(len(batch))
            batch = []
        if record is None:
            break
    report.datasets = len(members)
    if prune:
        report.stale_removed = await _prune(store, notifier, seen)
    if compact_logs:
        # Every dataset with a log, including those whose images were all deleted.
        datasets = set(members) | {
            prefix.split("/")[1]
            for prefix in await asyncio.to_thread(lambda: list(store.list_prefixes("datasets/")))
        }
        for dataset in datasets:
            old_segments[dataset] = await asyncio.to_thread(
                _keys, store, dataset_log_prefix(dataset)
            )
        for dataset in datasets:
            # Insertion order is kept: listings page in the same order as before.
            entries = [[sha, gen] for _, sha, gen in sorted(members.get(dataset, []))]
            for start in range(0, len(entries), _LOG_SEGMENT_ENTRIES):
                chunk = entries[start : start + _LOG_SEGMENT_ENTRIES]
                await asyncio.to_thread(
                    store.put_bytes,
                    dataset_log_key(dataset),
                    json.dumps(chunk, separators=(",", ":")).encode(),
                    "application/json",
                )
            for key in old_segments[dataset]:
                await asyncio.to_thread(store.delete, key)
                report.log_segments_removed += 1
    return report
