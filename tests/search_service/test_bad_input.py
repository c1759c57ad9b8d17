"""Every bad input of the contract: a clear INVALID_ARGUMENT (or NOT_FOUND), nothing written,
and the service keeps serving (a good call succeeds right after each bad one)."""

from __future__ import annotations

import asyncio
import base64

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from imagemesh.search.v1 import search_pb2
from tests.search_service.corpus import V1, name_of
from tests.search_service.servers import WAIT

F = search_pb2.ImageFilter
P = search_pb2.PredictionFilter
R = search_pb2.SearchImagesRequest

BAD_SEARCHES = {
    "page_size_negative": (R(page_size=-1), "page_size"),
    "page_size_too_big": (R(page_size=1001), "page_size"),
    "unknown_order_field": (R(order_by="width desc"), "unknown field 'width'"),
    "bad_direction": (R(order_by="filename upward"), "asc or desc"),
    "order_field_twice": (R(order_by="filename, filename desc"), "twice"),
    "order_syntax": (R(order_by="filename,,"), "order_by"),
    "relevance_without_text": (R(order_by="relevance"), "needs text"),
    "confidence_without_model": (R(order_by="confidence desc"), "model_version"),
    "inverted_time_range": (
        R(
            filter=F(
                create_time=search_pb2.TimeRange(
                    start_time=Timestamp(seconds=2000), end_time=Timestamp(seconds=1000)
                )
            )
        ),
        "after end_time",
    ),
    "inverted_confidence": (
        R(filter=F(prediction=P(min_confidence=0.9, max_confidence=0.1))),
        "above max_confidence",
    ),
    "confidence_above_one": (R(filter=F(prediction=P(min_confidence=1.5))), "[0, 1]"),
    "confidence_below_zero": (R(filter=F(prediction=P(max_confidence=-0.1))), "[0, 1]"),
    "bad_model_version": (R(filter=F(prediction=P(model_version="v3"))), "models/"),
    "text_too_long": (R(text="a" * 1025), "1025 characters"),
    "huge_text": (R(text="*:* " * 100_000), "characters"),
    "too_many_names": (R(filter=F(names=[name_of(str(i)) for i in range(1001)])), "1,000"),
    "malformed_name": (R(filter=F(names=["images/../../etc"])), "sha256"),
    "bad_attribute_key": (R(filter=F(attributes={"a b": "c"})), "attributes"),
    "garbage_token": (R(page_token="not-a-token"), "start again"),
}


async def _good_call_works(stub) -> None:
    reply = await stub.SearchImages(R(page_size=2, count_by=search_pb2.COUNT_FIELD_LABEL))
    assert reply.total_size == 3


@pytest.fixture
async def seeded(stub):
    docs = [
        search_pb2.ImageDocument(name=name_of(f"seed-{i}"), filename=f"seed{i}.png", label="cat")
        for i in range(3)
    ]
    await stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=WAIT))
    return stub


async def _expect_invalid(call, fragment: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert fragment in error.details()
    return error


@pytest.mark.parametrize("case", list(BAD_SEARCHES))
async def test_bad_search_is_invalid_argument_and_service_keeps_serving(seeded, case):
    request, fragment = BAD_SEARCHES[case]
    error = await _expect_invalid(seeded.SearchImages(request), fragment)
    # The status carries a BadRequest naming the field, for clients to act on.
    status = rpc_status.from_call(error)
    assert status is not None
    violations = [
        v
        for detail in status.details
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)
        for v in _unpack_bad_request(detail).field_violations
    ]
    assert violations
    await _good_call_works(seeded)


def _unpack_bad_request(detail):
    message = error_details_pb2.BadRequest()
    detail.Unpack(message)
    return message


async def _first_token(stub, **kwargs) -> str:
    reply = await stub.SearchImages(R(page_size=1, **kwargs))
    assert reply.next_page_token
    return reply.next_page_token


async def test_tampered_page_token_is_refused(seeded):
    token = await _first_token(seeded)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[-3] ^= 0x01  # one bit of the position
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    await _expect_invalid(seeded.SearchImages(R(page_size=1, page_token=tampered)), "start again")
    await _good_call_works(seeded)


async def test_page_token_of_another_query_is_refused(seeded):
    token = await _first_token(seeded, order_by="filename")
    await _expect_invalid(
        seeded.SearchImages(R(page_size=1, order_by="filename desc", page_token=token)),
        "this query",
    )
    # ...but the token works with its own query, even with another page size.
    reply = await seeded.SearchImages(R(page_size=2, order_by="filename", page_token=token))
    assert [d.filename for d in reply.documents] == ["seed1.png", "seed2.png"]


async def test_expired_page_token_is_refused(short_ttl_stub):
    stub = short_ttl_stub
    docs = [search_pb2.ImageDocument(name=name_of(f"e{i}"), filename="e.png") for i in range(3)]
    await stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=WAIT))
    token = await _first_token(stub)
    await asyncio.sleep(0.8)  # past the configured 0.5 s lifetime
    await _expect_invalid(stub.SearchImages(R(page_size=1, page_token=token)), "expired")
    assert (await stub.SearchImages(R(page_size=1))).total_size == 3


async def test_too_many_documents_is_refused_whole_and_writes_nothing(seeded):
    docs = [search_pb2.ImageDocument(name=name_of(f"many-{i}")) for i in range(10_001)]
    await _expect_invalid(
        seeded.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=WAIT)), "10,000"
    )
    await _good_call_works(seeded)  # still exactly the 3 seeded documents


async def test_too_many_predictions_is_refused(seeded):
    preds = [search_pb2.ImagePrediction(image=name_of("seed-0"))] * 10_001
    await _expect_invalid(
        seeded.IndexPredictions(search_pb2.IndexPredictionsRequest(predictions=preds)), "10,000"
    )
    await _good_call_works(seeded)


async def test_delete_with_one_malformed_name_deletes_nothing(seeded):
    names = [name_of("seed-0"), "images/nope"]
    await _expect_invalid(
        seeded.DeleteImages(search_pb2.DeleteImagesRequest(names=names, refresh=WAIT)), "sha256"
    )
    await _good_call_works(seeded)  # seed-0 is still there


async def test_get_malformed_or_unknown_name(seeded):
    await _expect_invalid(
        seeded.GetImageDocument(search_pb2.GetImageDocumentRequest(name="cat.png")), "images/"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await seeded.GetImageDocument(search_pb2.GetImageDocumentRequest(name=name_of("nope")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "index it first" in info.value.details()
    got = await seeded.GetImageDocument(search_pb2.GetImageDocumentRequest(name=name_of("seed-1")))
    assert got.document.filename == "seed1.png"


async def test_bad_prediction_items_are_reported_and_nothing_else_changes(seeded):
    from imagemesh.common.v1 import common_pb2

    bad = search_pb2.ImagePrediction(
        image=name_of("seed-0"),
        prediction=common_pb2.Prediction(model_version=V1, top_class="", confidence=0.5),
    )
    reply = await seeded.IndexPredictions(
        search_pb2.IndexPredictionsRequest(predictions=[bad], refresh=WAIT)
    )
    assert reply.indexed_count == 0
    assert reply.errors[0].error.reason == "MISSING_TOP_CLASS"
    got = await seeded.GetImageDocument(search_pb2.GetImageDocumentRequest(name=name_of("seed-0")))
    assert not got.document.predictions
