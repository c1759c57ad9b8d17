"""The search contract, run over a real gRPC channel on SQLite and on real Elasticsearch.

Every answer is compared with the reference model in `corpus.py`, so both backends give the
same documents in the same order, the same totals and the same counts.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from imagemesh.common.v1 import common_pb2
from imagemesh.search.v1 import search_pb2
from tests.search_service.corpus import BASE_S, CLASSES, V1, V3, Doc, expected, f32, name_of
from tests.search_service.servers import WAIT

F = search_pb2.ImageFilter
P = search_pb2.PredictionFilter


def _ts(offset_s: int) -> Timestamp:
    return Timestamp(seconds=BASE_S + offset_s)


FILTER_CASES = {
    "all": F(),
    "dataset": F(datasets=["train"]),
    "datasets_or": F(datasets=["train", "test"]),
    "label": F(labels=["dog", "cat"]),
    "tags_and": F(tags=["outdoor", "night shot"]),
    "tag_exact_only": F(tags=["night"]),
    "attributes": F(attributes={"camera": "b", "lens": "wide"}),
    "time_range": F(create_time=search_pb2.TimeRange(start_time=_ts(60), end_time=_ts(240))),
    "time_open_end": F(create_time=search_pb2.TimeRange(start_time=_ts(300))),
    "names": F(names=[name_of("corpus-3"), name_of("corpus-4"), name_of("nowhere")]),
    "any_prediction": F(prediction=P()),
    "model_version": F(prediction=P(model_version=V3)),
    "class_and_confidence": F(prediction=P(model_version=V1, classes=["cat"], min_confidence=0.9)),
    "confidence_band": F(prediction=P(min_confidence=0.25, max_confidence=0.75)),
    "combined": F(datasets=["train", "val"], prediction=P(classes=["dog", "bird"])),
}

TEXT_CASES = ["cat", "CAT png", "night", "img jpg", "label cat", "outdoor shot", "zebra"]

ORDERS = [
    "",
    "create_time",
    "filename desc",
    "size_bytes, filename",
    "size_bytes desc",
    "dataset, create_time desc",
    "label desc, size_bytes",
]


async def _search(stub, **kwargs) -> search_pb2.SearchImagesResponse:
    return await stub.SearchImages(search_pb2.SearchImagesRequest(page_size=1000, **kwargs))


def _names(reply: search_pb2.SearchImagesResponse) -> list[str]:
    return [d.name for d in reply.documents]


def _counts(reply: search_pb2.SearchImagesResponse) -> list[tuple[str, int]]:
    return [(c.value, c.count) for c in reply.counts]


@pytest.mark.parametrize("case", list(FILTER_CASES))
async def test_filters_give_the_reference_documents_total_and_counts(stub, corpus, case):
    flt = FILTER_CASES[case]
    for count_by in (search_pb2.COUNT_FIELD_PREDICTED_CLASS, search_pb2.COUNT_FIELD_LABEL):
        reply = await _search(stub, filter=flt, count_by=count_by)
        names, counts = expected(corpus, flt, count_by=count_by)
        assert _names(reply) == names
        assert reply.total_size == len(names)
        assert _counts(reply) == counts
        assert not reply.next_page_token


async def test_prediction_conditions_hold_on_the_same_prediction(stub, corpus):
    # corpus-1: v1 says cat at 0.95, v3 says cat at 0.5. "v3 calls it cat with >= 0.9" must not
    # match it, although some prediction says cat and some prediction is >= 0.9.
    flt = F(prediction=P(model_version=V3, classes=["cat"], min_confidence=0.9))
    reply = await _search(stub, filter=flt)
    assert name_of("corpus-1") not in _names(reply)
    reply = await _search(stub, filter=F(prediction=P(model_version=V1, classes=["cat"])))
    assert name_of("corpus-1") in _names(reply)


@pytest.mark.parametrize("order_by", ORDERS)
async def test_orderings_match_the_reference_with_ties_broken_by_name(stub, corpus, order_by):
    reply = await _search(stub, order_by=order_by)
    assert _names(reply) == expected(corpus, order_by=order_by)[0]


async def test_order_by_confidence_of_the_filtered_model_version(stub, corpus):
    flt = F(prediction=P(model_version=V1))
    for order_by in ("confidence desc", "confidence, create_time desc"):
        reply = await _search(stub, filter=flt, order_by=order_by)
        assert _names(reply) == expected(corpus, flt, order_by=order_by)[0]


@pytest.mark.parametrize("text", TEXT_CASES)
async def test_text_matches_words_of_filenames_and_tags(stub, corpus, text):
    reply = await _search(stub, text=text, count_by=search_pb2.COUNT_FIELD_DATASET)
    names, counts = expected(corpus, text=text, count_by=search_pb2.COUNT_FIELD_DATASET)
    assert _names(reply) == names
    assert _counts(reply) == counts


async def test_text_never_matches_other_fields(stub, corpus):
    # "dog" is a label of many documents but the filename or tag of none but the dog_ files;
    # datasets ("train") and attributes ("wide") are not text at all.
    for word in ("train", "wide", "images"):
        assert (await _search(stub, text=word)).total_size == 0
    dogs = await _search(stub, text="dog")
    assert all("dog" in d.filename.lower() for d in dogs.documents)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("*:*", 0),  # no words at all: matches nothing, never everything
        ("label:cat", 1),  # the words "label" and "cat": only the file "label cat.png"
        ('"cat', None),  # an unbalanced quote is just the word cat
        ("cat AND NOT dog OR (", None),  # operators are words, all required
        ("filename:cat~2^5 /reg.*ex/", 0),
        ("\\ \" ' ; -- DROP TABLE images", 0),
        ("(" * 1024, 0),  # the longest text allowed, all syntax
    ],
)
async def test_query_syntax_is_searched_literally(stub, corpus, text, expect):
    reply = await _search(stub, text=text)
    names, _ = expected(corpus, text=text)
    assert _names(reply) == names
    if expect is not None:
        assert reply.total_size == expect
    # ...and the service still answers a normal query afterwards.
    assert (await _search(stub, text="cat")).total_size > 0


async def test_relevance_order_returns_the_matching_documents(stub, corpus):
    reply = await _search(stub, text="cat", order_by="relevance")
    assert sorted(_names(reply)) == sorted(expected(corpus, text="cat")[0])


async def test_small_pages_walk_the_same_sequence_as_one_page(stub, corpus):
    flt = F(datasets=["train", "val"])
    for order_by in ("", "size_bytes desc, filename"):
        whole = _names(await _search(stub, filter=flt, order_by=order_by))
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            reply = await stub.SearchImages(
                search_pb2.SearchImagesRequest(
                    filter=flt,
                    order_by=order_by,
                    page_size=5,
                    page_token=token,
                    count_by=search_pb2.COUNT_FIELD_DATASET,
                )
            )
            assert reply.total_size == len(whole)
            assert _counts(reply) == expected([d for d in corpus], flt, count_by=3)[1]
            seen.extend(_names(reply))
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        assert seen == whole
        assert pages == -(-len(whole) // 5)


async def test_paging_while_documents_are_added_loses_and_repeats_nothing(stub, corpus):
    originals = {d.name for d in corpus}
    added: list[str] = []

    async def add_documents() -> None:
        for batch in range(6):
            docs = []
            for j in range(5):
                n = batch * 5 + j
                doc = Doc(
                    name=name_of(f"late-{n}"),
                    filename=f"late_{n}.png",
                    dataset="train",
                    label="cat",
                    tags=[],
                    attributes={},
                    size_bytes=1,
                    # Spread over the whole order, before and after any cursor.
                    create_ns=(BASE_S + n * 17) * 1_000_000_000,
                )
                docs.append(doc.proto())
                added.append(doc.name)
            await stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=WAIT))
            await asyncio.sleep(0)

    seen: list[str] = []
    token = ""
    reply = await stub.SearchImages(search_pb2.SearchImagesRequest(page_size=4))
    first_total = reply.total_size
    writer = asyncio.create_task(add_documents())
    while True:
        seen.extend(_names(reply))
        token = reply.next_page_token
        if not token:
            break
        await asyncio.sleep(0.01)
        reply = await stub.SearchImages(
            search_pb2.SearchImagesRequest(page_size=4, page_token=token)
        )
    await writer
    assert len(seen) == len(set(seen)), "a document was returned twice"
    assert originals <= set(seen), f"missing: {originals - set(seen)}"
    assert first_total == len(corpus)
    # A fresh search sees everything now.
    assert (await _search(stub)).total_size == len(corpus) + len(added)


async def test_document_round_trips_every_field(stub, corpus):
    doc = corpus[4]
    got = (await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=doc.name))).document
    want = doc.proto()
    want.predictions.extend(
        sorted((p.prediction for p in doc.prediction_protos()), key=lambda p: p.model_version)
    )
    assert got == want


async def test_reindexing_replaces_metadata_and_keeps_predictions(stub, corpus):
    doc = corpus[0]
    new = doc.proto()
    new.label = "tree"
    new.ClearField("tags")
    new.attributes.clear()
    new.attributes["camera"] = "z"
    reply = await stub.IndexImages(search_pb2.IndexImagesRequest(documents=[new], refresh=WAIT))
    assert reply.indexed_count == 1
    got = (await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=doc.name))).document
    assert got.label == "tree"
    assert list(got.tags) == []
    assert dict(got.attributes) == {"camera": "z"}
    assert {p.model_version for p in got.predictions} == set(doc.predictions)
    # Indexing the same document again leaves one document.
    await stub.IndexImages(search_pb2.IndexImagesRequest(documents=[new, new], refresh=WAIT))
    assert (await _search(stub)).total_size == len(corpus)
    assert _names(await _search(stub, filter=F(attributes={"camera": "z"}))) == [doc.name]


async def test_a_prediction_replaces_the_one_of_the_same_model_version(stub, corpus):
    doc = corpus[0]
    pred = common_pb2.Prediction(model_version=V1, top_class="tree", confidence=0.99)
    reply = await stub.IndexPredictions(
        search_pb2.IndexPredictionsRequest(
            predictions=[search_pb2.ImagePrediction(image=doc.name, prediction=pred)], refresh=WAIT
        )
    )
    assert reply.indexed_count == 1
    assert not reply.errors
    got = (await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=doc.name))).document
    by_version = {p.model_version: p for p in got.predictions}
    assert len(got.predictions) == len(doc.predictions)
    assert by_version[V1].top_class == "tree"
    assert by_version[V1].confidence == f32(0.99)
    flt = F(prediction=P(model_version=V1, classes=["tree"], min_confidence=0.98))
    assert _names(await _search(stub, filter=flt)) == [doc.name]


async def test_bulk_writes_report_bad_items_and_apply_the_rest(stub, corpus):
    good = search_pb2.ImageDocument(name=name_of("fresh"), filename="fresh.png")
    bad_name = search_pb2.ImageDocument(name="images/NOT-A-SHA", filename="x.png")
    bad_dataset = search_pb2.ImageDocument(name=name_of("bad-ds"), dataset="Bad Dataset!")
    reply = await stub.IndexImages(
        search_pb2.IndexImagesRequest(documents=[good, bad_name, bad_dataset], refresh=WAIT)
    )
    assert reply.indexed_count == 1
    assert [(e.name, e.error.code) for e in reply.errors] == [
        ("images/NOT-A-SHA", "INVALID_ARGUMENT"),
        (name_of("bad-ds"), "INVALID_ARGUMENT"),
    ]
    assert "sha256" in reply.errors[0].error.message
    assert (await _search(stub, text="fresh")).total_size == 1
    assert (await _search(stub)).total_size == len(corpus) + 1

    preds = [
        search_pb2.ImagePrediction(
            image=name_of("fresh"),
            prediction=common_pb2.Prediction(model_version=V3, top_class="cat", confidence=0.5),
        ),
        search_pb2.ImagePrediction(
            image=name_of("never-indexed"),
            prediction=common_pb2.Prediction(model_version=V3, top_class="cat", confidence=0.5),
        ),
        search_pb2.ImagePrediction(
            image=name_of("fresh"),
            prediction=common_pb2.Prediction(model_version="v3", top_class="cat", confidence=0.5),
        ),
        search_pb2.ImagePrediction(
            image=name_of("fresh"),
            prediction=common_pb2.Prediction(model_version=V1, top_class="cat", confidence=1.5),
        ),
    ]
    reply = await stub.IndexPredictions(
        search_pb2.IndexPredictionsRequest(predictions=preds, refresh=WAIT)
    )
    assert reply.indexed_count == 1
    assert sorted((e.name, e.error.code, e.error.reason) for e in reply.errors) == sorted(
        [
            (name_of("never-indexed"), "NOT_FOUND", "IMAGE_NOT_INDEXED"),
            (name_of("fresh"), "INVALID_ARGUMENT", "INVALID_MODEL_VERSION_NAME"),
            (name_of("fresh"), "INVALID_ARGUMENT", "CONFIDENCE_OUT_OF_RANGE"),
        ]
    )
    # The unknown image was not created by recording a prediction on it.
    assert (await _search(stub)).total_size == len(corpus) + 1


async def test_delete_removes_documents_and_counts_only_existing_ones(stub, corpus):
    names = [corpus[0].name, corpus[1].name, name_of("never-indexed")]
    reply = await stub.DeleteImages(search_pb2.DeleteImagesRequest(names=names, refresh=WAIT))
    assert reply.deleted_count == 2
    assert (await _search(stub)).total_size == len(corpus) - 2
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetImageDocument(search_pb2.GetImageDocumentRequest(name=corpus[0].name))
    assert info.value.code().name == "NOT_FOUND"
    # Predictions went with the documents: the counts no longer include them.
    reply2 = await _search(stub, count_by=search_pb2.COUNT_FIELD_PREDICTED_CLASS)
    assert _counts(reply2) == expected(corpus[2:], count_by=2)[1]


async def test_wait_for_makes_a_write_visible_to_the_next_search(stub):
    for i in range(3):
        doc = search_pb2.ImageDocument(name=name_of(f"visible-{i}"), filename=f"visible{i}.png")
        await stub.IndexImages(search_pb2.IndexImagesRequest(documents=[doc], refresh=WAIT))
        assert (await _search(stub, text=f"visible{i}")).total_size == 1


async def test_default_refresh_writes_become_visible_soon(stub):
    doc = search_pb2.ImageDocument(name=name_of("eventually"), filename="eventually.png")
    reply = await stub.IndexImages(search_pb2.IndexImagesRequest(documents=[doc]))
    assert reply.indexed_count == 1
    for _ in range(100):  # visible within about a second (ES refresh interval); bounded poll
        if (await _search(stub, text="eventually")).total_size == 1:
            break
        await asyncio.sleep(0.05)
    assert (await _search(stub, text="eventually")).total_size == 1


def test_corpus_covers_every_class_and_both_model_versions():
    from tests.search_service.corpus import build_corpus

    docs = build_corpus()
    assert {c for d in docs for c, _ in d.predictions.values()} == set(CLASSES)
    assert {v for d in docs for v in d.predictions} == {V1, V3}
