"""A TEST DOUBLE of the SearchService: records IndexImages/DeleteImages calls.

Used while the real search service is built concurrently; it can also be told to fail
(answer UNAVAILABLE) to exercise the storage service's retry queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from imagemesh.search.v1 import search_pb2, search_pb2_grpc


class RecordingSearchService(search_pb2_grpc.SearchServiceServicer):
    """Keeps the documents it was asked to index, by name; `fail` makes it answer UNAVAILABLE."""

    def __init__(self) -> None:
        self.documents: dict[str, search_pb2.ImageDocument] = {}
        self.deleted: list[str] = []
        self.index_calls = 0
        self.fail = False
        self.address = ""
        self._server: grpc.aio.Server | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        await self.start_at("127.0.0.1:0")

    async def start_at(self, address: str) -> None:
        """Serves at `address` (port 0 picks a free one)."""
        self._server = grpc.aio.server()
        search_pb2_grpc.add_SearchServiceServicer_to_server(self, self._server)
        port = self._server.add_insecure_port(address)
        self.address = f"127.0.0.1:{port}"
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def IndexImages(self, request: Any, context: Any) -> search_pb2.IndexImagesResponse:
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "test double told to fail")
        self.index_calls += 1
        for document in request.documents:
            self.documents[document.name] = document
        self.changed.set()
        return search_pb2.IndexImagesResponse(indexed_count=len(request.documents))

    async def DeleteImages(self, request: Any, context: Any) -> search_pb2.DeleteImagesResponse:
        if self.fail:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "test double told to fail")
        count = 0
        for name in request.names:
            self.deleted.append(name)
            count += self.documents.pop(name, None) is not None
        self.changed.set()
        return search_pb2.DeleteImagesResponse(deleted_count=count)

    async def wait_for(self, predicate, within_s: float = 20.0) -> None:
        """Waits until `predicate()` holds (the outbox drains in the background)."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.5)
