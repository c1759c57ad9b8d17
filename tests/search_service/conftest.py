"""Fixtures: a search service on each backend in turn (SQLite, real Elasticsearch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imagemesh.config import Settings
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from tests.search_service.corpus import Doc, build_corpus
from tests.search_service.servers import WAIT, drop_template, running_search, search_settings


def _settings(request: pytest.FixtureRequest, tmp_path: Path, **extra: object) -> Settings:
    if request.param == "elasticsearch":
        index = request.getfixturevalue("es_index")
        request.addfinalizer(lambda: drop_template(index.url, index.prefix))
        return search_settings(
            "elasticsearch", tmp_path, es_url=index.url, prefix=index.prefix, **extra
        )
    return search_settings("sqlite", tmp_path, **extra)


@pytest.fixture(params=["sqlite", "elasticsearch"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings of a search service on each backend in turn (the contract's parameter)."""
    return _settings(request, tmp_path)


@pytest.fixture
async def stub(backend_settings: Settings) -> AsyncIterator[search_pb2_grpc.SearchServiceStub]:
    """A stub of a running search service on the backend under test."""
    async with running_search(backend_settings) as s:
        yield s


@pytest.fixture
async def corpus(stub: search_pb2_grpc.SearchServiceStub) -> list[Doc]:
    """The shared corpus, indexed with its predictions and visible to searches."""
    docs = build_corpus()
    reply = await stub.IndexImages(
        search_pb2.IndexImagesRequest(documents=[d.proto() for d in docs], refresh=WAIT)
    )
    assert reply.indexed_count == len(docs)
    assert not reply.errors
    predictions = [p for d in docs for p in d.prediction_protos()]
    reply2 = await stub.IndexPredictions(
        search_pb2.IndexPredictionsRequest(predictions=predictions, refresh=WAIT)
    )
    assert reply2.indexed_count == len(predictions)
    assert not reply2.errors
    return docs


@pytest.fixture(params=["sqlite", "elasticsearch"])
async def short_ttl_stub(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[search_pb2_grpc.SearchServiceStub]:
    """A search service whose page tokens expire after half a second."""
    settings = _settings(request, tmp_path, page_token_ttl_s=0.5)
    async with running_search(settings) as s:
        yield s
