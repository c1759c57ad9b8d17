"""SQLite and Elasticsearch side by side: the same requests get the same replies, field by
field (documents, order, totals, counts), page after page."""

from __future__ import annotations

from imagemesh.search.v1 import search_pb2
from tests.search_service.corpus import V1, V3, build_corpus
from tests.search_service.servers import WAIT, drop_template, running_search, search_settings

F = search_pb2.ImageFilter
P = search_pb2.PredictionFilter
R = search_pb2.SearchImagesRequest

REQUESTS = [
    R(count_by=search_pb2.COUNT_FIELD_PREDICTED_CLASS),
    R(
        filter=F(prediction=P(model_version=V1, min_confidence=0.5)),
        order_by="confidence desc",
        count_by=search_pb2.COUNT_FIELD_PREDICTED_CLASS,
    ),
    R(
        filter=F(datasets=["train"], prediction=P(model_version=V3, classes=["cat", "dog"])),
        count_by=search_pb2.COUNT_FIELD_LABEL,
    ),
    R(text="cat png", order_by="filename desc", count_by=search_pb2.COUNT_FIELD_DATASET),
    R(filter=F(tags=["outdoor"], attributes={"camera": "a"}), order_by="size_bytes, label desc"),
    R(text="*:* OR label:cat"),
]


async def _pages(stub, request: search_pb2.SearchImagesRequest) -> list[tuple]:
    out = []
    token = ""
    while True:
        req = search_pb2.SearchImagesRequest()
        req.CopyFrom(request)
        req.page_size = 4
        req.page_token = token
        reply = await stub.SearchImages(req)
        out.append((list(reply.documents), reply.total_size, list(reply.counts)))
        token = reply.next_page_token
        if not token:
            return out


async def test_sqlite_and_elasticsearch_give_identical_replies(es_index, tmp_path):
    corpus = build_corpus()
    sqlite = search_settings("sqlite", tmp_path)
    es = search_settings("elasticsearch", tmp_path, es_url=es_index.url, prefix=es_index.prefix)
    try:
        async with running_search(sqlite) as a, running_search(es) as b:
            for stub in (a, b):
                await stub.IndexImages(
                    search_pb2.IndexImagesRequest(
                        documents=[d.proto() for d in corpus], refresh=WAIT
                    )
                )
                await stub.IndexPredictions(
                    search_pb2.IndexPredictionsRequest(
                        predictions=[p for d in corpus for p in d.prediction_protos()],
                        refresh=WAIT,
                    )
                )
            for request in REQUESTS:
                from_sqlite = await _pages(a, request)
                from_es = await _pages(b, request)
                assert from_sqlite == from_es, request
                assert from_sqlite[0][1] > 0 or request.text.startswith("*")
    finally:
        drop_template(es_index.url, es_index.prefix)
