"""The real SearchService (SQLite backend) served on its own port, for the storage tests.

The storage service tells search about every stored or deleted image through its durable
outbox; these tests check that against the real service, read back over gRPC. An outage is
a real one too: `stop` shuts the server down and `start` brings it back on the same port
and the same database.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable
from pathlib import Path

import grpc

from imagemesh.config import load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.server import MeshServer


class ServedSearch:
    """A SearchService on SQLite at `folder`; its index read back through SearchImages."""

    def __init__(self, folder: Path) -> None:
        self._settings = load_settings(
            storage={"local_root": folder / "unused-objects"},
            search={"sqlite_path": folder / "search.sqlite3"},
        )
        self._settings.server.access_log = False
        self.port = 0
        self._server: MeshServer | None = None
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Serves (again) at the same port; a free one the first time."""
        self._server, self.port = build_mesh(self._settings, ["search"], port=self.port)
        await self._server.start()

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._server is not None:
            await self._server.stop(grace=0)
            self._server = None

    def _stub(self) -> search_pb2_grpc.SearchServiceStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address)
        return search_pb2_grpc.SearchServiceStub(self._channel)

    async def documents(self) -> dict[str, search_pb2.ImageDocument]:
        """Every indexed document, by name."""
        found: dict[str, search_pb2.ImageDocument] = {}
        token = ""
        while True:
            page = await self._stub().SearchImages(
                search_pb2.SearchImagesRequest(page_size=1000, page_token=token)
            )
            found.update((d.name, d) for d in page.documents)
            token = page.next_page_token
            if not token:
                return found

    async def wait_for_names(self, names: set[str], within_s: float = 20.0) -> None:
        """Waits until the indexed names are exactly `names` (the outbox drains by itself)."""
        async with asyncio.timeout(within_s):
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if set(await self.documents()) == names:
                        return
                await asyncio.sleep(0.05)


async def eventually(predicate: Callable[[], bool], within_s: float = 20.0) -> None:
    """Polls `predicate` until it holds (what the outbox does happens in the background)."""
    async with asyncio.timeout(within_s):
        for _ in itertools.count():
            if predicate():
                return
            await asyncio.sleep(0.05)
