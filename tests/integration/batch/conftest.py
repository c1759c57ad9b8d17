"""Fixtures of the batch integration tests: the tiny model of the unit tests, and a REAL
SearchService on Elasticsearch holding the documents of the images a job classifies.

The search service runs in a thread of the test process, on its own event loop (grpc.aio
servers belong to the loop that creates them); Spark's Python workers reach it over gRPC like
any client, so what the tests read back is what Elasticsearch really holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from imagemesh.config import load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from tests.fixtures.engines import delete_es_prefix
from tests.inference_service.batch.conftest import model_root

__all__ = ["ServedSearch", "model_root", "served_search"]


class ServedSearch:
    """A running search service: its address, and a stub on a channel to it."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self.stub = search_pb2_grpc.SearchServiceStub(self._channel)

    def index_images(self, names: list[str], dataset: str) -> None:
        """Indexes a document per image (predictions attach to existing documents only)."""
        for start in range(0, len(names), 1000):
            reply = self.stub.IndexImages(
                search_pb2.IndexImagesRequest(
                    documents=[
                        search_pb2.ImageDocument(name=n, dataset=dataset, filename=f"{i}.png")
                        for i, n in enumerate(names[start : start + 1000], start)
                    ],
                    refresh=search_pb2.REFRESH_POLICY_WAIT_FOR,
                )
            )
            assert not reply.errors, reply.errors[:3]

    def documents_predicted_by(self, model_version: str) -> list[Any]:
        """Every document holding a prediction of `model_version`, page by page."""
        found: list[Any] = []
        token = ""
        while True:
            page = self.stub.SearchImages(
                search_pb2.SearchImagesRequest(
                    filter=search_pb2.ImageFilter(
                        prediction=search_pb2.PredictionFilter(model_version=model_version)
                    ),
                    page_size=1000,
                    page_token=token,
                )
            )
            found.extend(page.documents)
            token = page.next_page_token
            if not token:
                return found

    def close(self) -> None:
        self._channel.close()


@contextlib.contextmanager
def _search_in_thread(settings: Any) -> Iterator[str]:
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def serve() -> None:
        try:
            server, port = build_mesh(settings, ["search"], port=0)
            await server.start()
        except BaseException as exc:
            state["error"] = exc
            ready.set()
            raise
        stop = asyncio.Event()
        state.update(address=f"127.0.0.1:{port}", loop=asyncio.get_running_loop(), stop=stop)
        ready.set()
        await stop.wait()
        await server.stop(grace=1)

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="search", daemon=True)
    thread.start()
    assert ready.wait(120), "the search service did not start"
    if "error" in state:
        raise state["error"]
    try:
        yield state["address"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(30)


@pytest.fixture(scope="module")
def served_search(es_engine: str) -> Iterator[ServedSearch]:
    """A search service on Elasticsearch under a prefix of its own, removed afterwards."""
    prefix = f"test-batch-{uuid.uuid4().hex[:12]}"
    settings = load_settings(
        search={
            "backend": "elasticsearch",
            "elasticsearch": {"url": es_engine, "index_prefix": prefix},
        }
    )
    settings.server.access_log = False
    try:
        with _search_in_thread(settings) as address:
            served = ServedSearch(address)
            try:
                yield served
            finally:
                served.close()
    finally:
        delete_es_prefix(es_engine, prefix)
