"""Elasticsearch is the real 8.19.21 server: it indexes documents and finds them."""

from __future__ import annotations

import os

from elasticsearch import Elasticsearch

from tests.fixtures.engines import EsIndex

EXPECTED_VERSION = "8.19.21"


def test_server_reports_the_pinned_version(es_index: EsIndex) -> None:
    # The integ-test-zip has no `GET /` (its rest-root module is absent), so client.info() and
    # client.ping() fail there; the nodes API carries each node's version instead.
    with Elasticsearch(es_index.url) as client:
        nodes = client.nodes.info(filter_path="nodes.*.version")["nodes"]
        health = client.cluster.health()
    assert {node["version"] for node in nodes.values()} == {EXPECTED_VERSION}
    expected_nodes = int(os.environ.get("ENGINES_ES_NODES", "1"))
    assert health["number_of_nodes"] == expected_nodes


def test_indexed_document_is_found_by_a_full_text_search(es_index: EsIndex) -> None:
    index = es_index.name("images")
    with Elasticsearch(es_index.url) as client:
        client.indices.create(
            index=index,
            mappings={
                "properties": {
                    "caption": {"type": "text"},
                    "label": {"type": "keyword"},
                    "embedding": {"type": "dense_vector", "dims": 3, "similarity": "cosine"},
                }
            },
        )
        client.index(
            index=index,
            id="img-1",
            document={
                "caption": "a tabby cat asleep on a sofa",
                "label": "cat",
                "embedding": [1.0, 0.0, 0.0],
            },
        )
        client.index(
            index=index,
            id="img-2",
            document={
                "caption": "a red bicycle by a wall",
                "label": "bicycle",
                "embedding": [0.0, 1.0, 0.0],
            },
        )
        # Search sees documents after a refresh (once a second by default): make it now.
        client.indices.refresh(index=index)

        text = client.search(index=index, query={"match": {"caption": "sleeping cat"}})
        vector = client.search(
            index=index,
            knn={
                "field": "embedding",
                "query_vector": [0.9, 0.1, 0.0],
                "k": 1,
                "num_candidates": 10,
            },
        )

    assert [hit["_id"] for hit in text["hits"]["hits"]] == ["img-1"]
    assert [hit["_id"] for hit in vector["hits"]["hits"]] == ["img-1"]


def test_index_prefix_is_unique_per_test(es_index: EsIndex) -> None:
    with Elasticsearch(es_index.url) as client:
        assert not client.indices.exists(index=es_index.name("images"))
