"""Fixtures of the batch integration tests: the tiny model of the unit tests, and a REAL
SearchService on Elasticsearch holding the documents of the images a job classifies.

The search service runs in a thread of the test process, on its own event loop
(`ThreadedSearch`); Spark's Python workers reach it over gRPC like any client, so what the
tests read back is what Elasticsearch really holds.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.engines import delete_es_prefix
from tests.fixtures.served_search import ThreadedSearch
from tests.inference_service.batch.conftest import model_root

__all__ = ["model_root", "served_search"]


@pytest.fixture(scope="module")
def served_search(
    es_engine: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedSearch]:
    """A search service on Elasticsearch under a prefix of its own, removed afterwards."""
    prefix = f"test-batch-{uuid.uuid4().hex[:12]}"
    folder: Path = tmp_path_factory.mktemp("search")
    served = ThreadedSearch(
        folder,
        {"backend": "elasticsearch", "elasticsearch": {"url": es_engine, "index_prefix": prefix}},
    )
    try:
        served.start()
        yield served
    finally:
        served.close()
        delete_es_prefix(es_engine, prefix)
