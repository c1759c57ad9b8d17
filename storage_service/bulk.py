"""Bulk upload: many small images on one stream, stored concurrently, one outcome each.

A client sends images one after another; the server keeps up to `concurrency` of them in
flight (validating, checking for duplicates, writing), which overlaps the object store's
round trips that a client writing one image at a time waits out in sequence. Outcomes are
yielded as images finish, so in any order. A rejected image never ends the stream; only
an object store that cannot be reached does (after the outcomes already known), since then
every later image would fail too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from imagemesh.errors import ImageMeshError, InvalidArgument, Unavailable
from storage_service.records import ImageRecord
from storage_service.service import StorageDomain, UploadHeader

__all__ = ["BulkItem", "BulkOutcome", "bulk_upload"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BulkItem:
    """One image of a bulk stream; `header` is None when the client sent none."""

    request_id: str
    header: UploadHeader | None
    content: bytes


@dataclass(frozen=True)
class BulkOutcome:
    """What happened to one image: a record (stored or duplicate) or an error."""

    request_id: str
    record: ImageRecord | None = None
    duplicate: bool = False
    error: ImageMeshError | None = None


async def _store(domain: StorageDomain, item: BulkItem) -> BulkOutcome:
    try:
        if item.header is None:
            raise InvalidArgument(
                "each bulk message needs a header with at least a filename",
                reason="MISSING_HEADER",
                field="header",
            )
        record, duplicate = await domain.store_image_bytes(item.header, item.content)
        return BulkOutcome(item.request_id, record=record, duplicate=duplicate)
    except Unavailable:
        raise
    except ImageMeshError as exc:
        return BulkOutcome(item.request_id, error=exc)
    except Exception as exc:  # one image's unexpected failure must not end the stream
        _log.exception("bulk upload of %r failed", item.request_id)
        return BulkOutcome(
            item.request_id, error=ImageMeshError(f"internal error storing this image: {exc}")
        )


async def bulk_upload(
    domain: StorageDomain, items: AsyncIterator[BulkItem], *, concurrency: int
) -> AsyncIterator[BulkOutcome]:
    """Stores `items` with up to `concurrency` in flight; yields one outcome per item.

    Raises `Unavailable` (after yielding the outcomes already known) if the object store
    cannot be reached; errors raised by `items` itself propagate likewise.
    """
    outcomes: asyncio.Queue[BulkOutcome | BaseException | None] = asyncio.Queue()
    slots = asyncio.Semaphore(concurrency)
    workers: set[asyncio.Task[None]] = set()
    failed = asyncio.Event()

    async def work(item: BulkItem) -> None:
        try:
            outcomes.put_nowait(await _store(domain, item))
        except BaseException as exc:
            failed.set()
            outcomes.put_nowait(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for item in items:
                await slots.acquire()
                if failed.is_set():
                    break
                task = asyncio.create_task(work(item))
                workers.add(task)
                task.add_done_callback(workers.discard)
            if workers:
                await asyncio.gather(*list(workers), return_exceptions=True)
            outcomes.put_nowait(None)
        except Exception as exc:
            outcomes.put_nowait(exc)

    reader = asyncio.create_task(read())
    error: BaseException | None = None
    try:
        while True:
            outcome = await outcomes.get()
            if outcome is None:
                break
            if isinstance(outcome, BaseException):
                error = outcome
                break
            yield outcome
        if isinstance(error, Unavailable):
            # Stop reading, let the images in flight finish, and report them before failing.
            reader.cancel()
            await asyncio.gather(*list(workers), return_exceptions=True)
            while not outcomes.empty():
                late = outcomes.get_nowait()
                if isinstance(late, BulkOutcome):
                    yield late
    finally:
        reader.cancel()
        for task in list(workers):
            task.cancel()
        with contextlib.suppress(BaseException):
            await reader
    if error is not None:
        raise error
