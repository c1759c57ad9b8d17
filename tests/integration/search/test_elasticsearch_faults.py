"""Elasticsearch-specific behaviour on the real server: the index layout, a cluster that goes
away and comes back, and a point in time that expires under a cursor.

The outage is real: the service reaches Elasticsearch through a TCP relay on its own port
that the test opens and closes (connection refused while closed), so nothing is mocked and
the real cluster, shared with other tests, keeps running.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from elasticsearch import Elasticsearch

from imagemesh.search.v1 import search_pb2
from tests.search_service.corpus import name_of
from tests.search_service.servers import WAIT, drop_template, running_search, search_settings


class Relay:
    """A TCP relay from a local port to Elasticsearch that can be stopped and restarted."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for task in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            t = asyncio.ensure_future(task)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuses new connections and cuts the open ones, like a crashed node."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def relay(es_index) -> AsyncIterator[Relay]:
    r = Relay(9200)
    yield r
    await r.stop()


def _doc(i: int) -> search_pb2.ImageDocument:
    return search_pb2.ImageDocument(name=name_of(f"fault-{i}"), filename=f"fault{i}.png")


async def _expect_unavailable(call, url: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"Elasticsearch at {url}" in info.value.details()
    assert "down or unreachable" in info.value.details()


async def test_down_cluster_is_unavailable_and_the_service_recovers_by_itself(
    es_index, relay, tmp_path
):
    url = f"http://127.0.0.1:{relay.port}"
    settings = search_settings("elasticsearch", tmp_path, es_url=url, prefix=es_index.prefix)
    try:
        # The service starts while the cluster is unreachable, and says so on every call.
        async with running_search(settings) as stub:
            await _expect_unavailable(stub.SearchImages(search_pb2.SearchImagesRequest()), url)
            await _expect_unavailable(
                stub.IndexImages(search_pb2.IndexImagesRequest(documents=[_doc(0)])), url
            )
            # The cluster comes back: the next calls set the index up and succeed, no restart.
            await relay.start()
            reply = await stub.IndexImages(
                search_pb2.IndexImagesRequest(documents=[_doc(1)], refresh=WAIT)
            )
            assert reply.indexed_count == 1
            assert (await stub.SearchImages(search_pb2.SearchImagesRequest())).total_size == 1
            # It goes away again mid-life, then returns.
            await relay.stop()
            await _expect_unavailable(
                stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=_doc(1).name)), url
            )
            await relay.start()
            got = await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=_doc(1).name))
            assert got.document.filename == "fault1.png"
    finally:
        drop_template(es_index.url, es_index.prefix)


async def test_expired_point_in_time_is_invalid_argument_saying_so(es_index, tmp_path):
    settings = search_settings(
        "elasticsearch", tmp_path, es_url=es_index.url, prefix=es_index.prefix
    )
    try:
        async with running_search(settings) as stub:
            docs = [_doc(i) for i in range(5)]
            await stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=WAIT))
            first = await stub.SearchImages(search_pb2.SearchImagesRequest(page_size=2))
            second = await stub.SearchImages(
                search_pb2.SearchImagesRequest(page_size=2, page_token=first.next_page_token)
            )
            # The token's payload (readable, not forgeable) names the point in time; close it
            # behind the service's back, as its keep-alive running out would.
            token = second.next_page_token
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            pit = json.loads(raw[16:])["p"]["pit"]
            client = Elasticsearch(es_index.url)
            assert client.close_point_in_time(id=pit)["succeeded"]
            client.close()
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SearchImages(
                    search_pb2.SearchImagesRequest(page_size=2, page_token=token)
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "point in time has expired" in info.value.details()
            assert (await stub.SearchImages(search_pb2.SearchImagesRequest())).total_size == 5
    finally:
        drop_template(es_index.url, es_index.prefix)


async def test_index_layout_is_a_versioned_index_behind_an_alias_with_explicit_mapping(
    es_index, tmp_path
):
    settings = search_settings(
        "elasticsearch", tmp_path, es_url=es_index.url, prefix=es_index.prefix
    )
    try:
        async with running_search(settings):
            pass
        client = Elasticsearch(es_index.url)
        aliases = client.indices.get_alias(name=f"{es_index.prefix}-images")
        assert list(aliases) == [f"{es_index.prefix}-images-v1"]
        mapping = client.indices.get_mapping(index=f"{es_index.prefix}-images")
        props = mapping[f"{es_index.prefix}-images-v1"]["mappings"]["properties"]
        assert props["predictions"]["type"] == "nested"
        assert props["predictions"]["properties"]["model_version"]["type"] == "keyword"
        assert props["predictions"]["properties"]["confidence"]["type"] == "float"
        assert props["dataset"]["type"] == "keyword"
        assert props["create_time"]["type"] == "date_nanos"
        assert props["tags"]["type"] == "text"
        assert props["tags"]["fields"]["keyword"]["type"] == "keyword"
        assert props["filename"]["type"] == "text"
        template = client.indices.get_index_template(name=f"{es_index.prefix}-images")
        assert template["index_templates"][0]["index_template"]["index_patterns"] == [
            f"{es_index.prefix}-images-v*"
        ]
        # A document with an unmapped field is refused: the mapping is strict.
        with pytest.raises(Exception, match="strict"):
            client.index(index=f"{es_index.prefix}-images", document={"surprise": 1})
        client.close()
        # A second instance starting on the same layout reuses it.
        async with running_search(settings) as stub:
            assert (await stub.SearchImages(search_pb2.SearchImagesRequest())).total_size == 0
    finally:
        drop_template(es_index.url, es_index.prefix)
