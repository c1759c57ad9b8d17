"""Tells the SearchService about stored and deleted images, over its gRPC contract.

`SearchNotifier.send` is the outbox drainer's sender: it turns pending updates into
`IndexImages` / `DeleteImages` calls and reports which updates are done. Transient
failures (the service down, unreachable, or not implemented yet) leave the updates pending;
an update the search service refuses as invalid is dropped with an error log, since
resending it cannot succeed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import timestamp_pb2

from imagemesh.channels import open_channel
from imagemesh.config import Settings
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from storage_service.outbox import OutboxOp, SendResult
from storage_service.records import ImageRecord

__all__ = ["SearchNotifier", "image_document"]

_log = logging.getLogger(__name__)
_CALL_TIMEOUT_S = 30.0


def image_document(record: ImageRecord) -> search_pb2.ImageDocument:
    """The search document for a stored image."""
    created = timestamp_pb2.Timestamp()
    created.FromDatetime(record.create_time)
    return search_pb2.ImageDocument(
        name=record.name,
        filename=record.filename,
        dataset=record.dataset,
        label=record.label,
        tags=list(record.tags),
        attributes=record.attributes,
        content_type=record.content_type,
        size_bytes=record.size_bytes,
        width=record.width,
        height=record.height,
        create_time=created,
    )


class SearchNotifier:
    """A SearchService client for index updates; the channel opens on first use."""

    def __init__(self, address: str, settings: Settings) -> None:
        self.address = address
        # The deployment's TLS and token settings: the index updates travel like every other
        # service-to-service call (a plaintext fallback would leak past a TLS-only server).
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: search_pb2_grpc.SearchServiceAsyncStub | None = None
        self._failing = False

    def _client(self) -> search_pb2_grpc.SearchServiceAsyncStub:
        if self._stub is None:
            self._channel = open_channel(self.address, self._settings)
            self._stub = search_pb2_grpc.SearchServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        """Closes the channel."""
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
            self._stub = None

    async def index(self, documents: Sequence[search_pb2.ImageDocument]) -> list[str]:
        """Indexes documents; returns the names the service refused as invalid.

        Raises `grpc.aio.AioRpcError` when the call as a whole fails.
        """
        reply = await self._client().IndexImages(
            search_pb2.IndexImagesRequest(documents=list(documents)), timeout=_CALL_TIMEOUT_S
        )
        refused = []
        retry = []
        for error in reply.errors:
            if error.error.code == "INVALID_ARGUMENT":
                refused.append(error.name)
            else:
                retry.append(error.name)
        if retry:
            raise _PartialFailure(retry, refused)
        return refused

    async def indexed_names(self, page_size: int = 1000) -> AsyncIterator[list[str]]:
        """Every indexed image's name, a page at a time (oldest first, so that documents
        indexed during the walk come last instead of shifting the pages already read)."""
        token = ""
        while True:
            page = await self._client().SearchImages(
                search_pb2.SearchImagesRequest(
                    order_by="create_time asc", page_size=page_size, page_token=token
                ),
                timeout=_CALL_TIMEOUT_S,
            )
            yield [document.name for document in page.documents]
            token = page.next_page_token
            if not token:
                return

    async def delete(self, names: Sequence[str]) -> None:
        """Removes documents; raises `grpc.aio.AioRpcError` on failure."""
        await self._client().DeleteImages(
            search_pb2.DeleteImagesRequest(names=list(names)), timeout=_CALL_TIMEOUT_S
        )

    async def send(self, ops: Sequence[OutboxOp]) -> SendResult:
        """Sends outbox updates; see the module docstring for what counts as done."""
        done: list[OutboxOp] = []
        retry_later = False
        deletes = [op for op in ops if op.kind == "delete"]
        indexes = [op for op in ops if op.kind == "index" and op.document is not None]
        if deletes:
            try:
                await self.delete([op.name for op in deletes])
                done.extend(deletes)
            except grpc.aio.AioRpcError as exc:
                retry_later = True
                self._log_failure("DeleteImages", len(deletes), exc)
        if indexes:
            documents = [search_pb2.ImageDocument.FromString(op.document or b"") for op in indexes]
            try:
                refused = await self.index(documents)
                for name in refused:
                    _log.error("search refused the document of %s as invalid; dropped", name)
                done.extend(indexes)
            except _PartialFailure as partial:
                retry_later = True
                not_done = set(partial.retry)
                done.extend(op for op in indexes if op.name not in not_done)
            except grpc.aio.AioRpcError as exc:
                retry_later = True
                self._log_failure("IndexImages", len(indexes), exc)
        if not retry_later and self._failing:
            self._failing = False
            _log.warning(
                "SearchService at %s reachable again; the index is catching up", self.address
            )
        # Updates that are not index/delete (none today) must not block the queue.
        done.extend(op for op in ops if op.kind == "index" and op.document is None)
        return SendResult(done=done, retry_later=retry_later)

    def _log_failure(self, rpc: str, count: int, exc: grpc.aio.AioRpcError) -> None:
        # One warning per outage, not one per retry; the outbox keeps the updates meanwhile.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        _log.log(
            level,
            "SearchService.%s at %s failed for %d images (%s: %s); retrying with backoff",
            rpc,
            self.address,
            count,
            exc.code().name,
            exc.details(),
        )


class _PartialFailure(Exception):
    def __init__(self, retry: list[str], refused: list[str]) -> None:
        super().__init__(f"{len(retry)} documents not indexed")
        self.retry = retry
        self.refused = refused
