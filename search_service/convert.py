"""Protobuf messages to and from the search domain's values (transport side only)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.timestamp_pb2 import Timestamp

from imagemesh.common.v1 import common_pb2
from imagemesh.search.v1 import search_pb2
from search_service.model import (
    ClassScore,
    CountField,
    ImageFilter,
    ImageRecord,
    ItemFailure,
    PredictionFilter,
    PredictionRecord,
    SearchRequest,
)

__all__ = [
    "add_documents",
    "document_from_proto",
    "document_to_proto",
    "failure_to_proto",
    "prediction_from_proto",
    "search_request_from_proto",
]

_COUNT_FIELDS = {
    search_pb2.COUNT_FIELD_LABEL: CountField.LABEL,
    search_pb2.COUNT_FIELD_PREDICTED_CLASS: CountField.PREDICTED_CLASS,
    search_pb2.COUNT_FIELD_DATASET: CountField.DATASET,
}


def _ns(ts: Timestamp) -> int:
    return ts.seconds * 1_000_000_000 + ts.nanos


def _set_timestamp(ts: Timestamp, ns: int) -> None:
    ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)


def prediction_from_proto(p: common_pb2.Prediction) -> PredictionRecord:
    """A domain prediction from its message."""
    return PredictionRecord(
        model_version=p.model_version,
        top_class=p.top_class,
        confidence=p.confidence,
        top_classes=tuple(
            ClassScore(s.class_name, s.class_index, s.probability) for s in p.top_classes
        ),
        predict_time_ns=_ns(p.predict_time) if p.HasField("predict_time") else None,
        probabilities_array=p.probabilities_array,
    )


def document_from_proto(d: search_pb2.ImageDocument) -> ImageRecord:
    """A domain document from its message (predictions are output only and dropped)."""
    # An unset create_time reads as the epoch, which is 0 like "unset": no HasField needed.
    created = d.create_time
    return ImageRecord(
        name=d.name,
        filename=d.filename,
        dataset=d.dataset,
        label=d.label,
        tags=tuple(d.tags),
        attributes=dict(d.attributes),
        content_type=d.content_type,
        size_bytes=d.size_bytes,
        width=d.width,
        height=d.height,
        create_time_ns=created.seconds * 1_000_000_000 + created.nanos,
    )


def _document_fields(r: ImageRecord) -> dict[str, Any]:
    return {
        "name": r.name,
        "filename": r.filename,
        "dataset": r.dataset,
        "label": r.label,
        "tags": r.tags,
        "attributes": r.attributes,
        "content_type": r.content_type,
        "size_bytes": r.size_bytes,
        "width": r.width,
        "height": r.height,
    }


def _fill_nested(message: search_pb2.ImageDocument, r: ImageRecord) -> None:
    # Submessages are filled in place (add, set), never built apart and copied in.
    _set_timestamp(message.create_time, r.create_time_ns)
    for p in r.predictions:
        prediction = message.predictions.add(
            model_version=p.model_version,
            top_class=p.top_class,
            confidence=p.confidence,
            probabilities_array=p.probabilities_array,
        )
        for score in p.top_classes:
            prediction.top_classes.add(
                class_name=score.class_name,
                class_index=score.class_index,
                probability=score.probability,
            )
        if p.predict_time_ns is not None:
            _set_timestamp(prediction.predict_time, p.predict_time_ns)


def document_to_proto(r: ImageRecord) -> search_pb2.ImageDocument:
    """The message of a domain document."""
    message = search_pb2.ImageDocument(**_document_fields(r))
    _fill_nested(message, r)
    return message


def add_documents(
    container: RepeatedCompositeFieldContainer[search_pb2.ImageDocument],
    records: Iterable[ImageRecord],
) -> None:
    """Appends the messages of domain documents to a repeated field, e.g. a response's.

    Each is built inside the container: a message built apart would be copied in whole,
    which costs as much as building it, and a search page holds 20 to 1,000 documents.
    """
    for r in records:
        _fill_nested(container.add(**_document_fields(r)), r)


def failure_to_proto(f: ItemFailure) -> search_pb2.IndexItemError:
    """The message of one failed bulk item."""
    return search_pb2.IndexItemError(
        name=f.name,
        error=common_pb2.ItemError(code=f.code, reason=f.reason, message=f.message),
    )


def search_request_from_proto(r: search_pb2.SearchImagesRequest) -> SearchRequest:
    """The domain request of a SearchImages call (not yet validated)."""
    f = r.filter
    prediction = None
    if f.HasField("prediction"):
        p = f.prediction
        prediction = PredictionFilter(
            model_version=p.model_version,
            classes=tuple(p.classes),
            min_confidence=p.min_confidence if p.HasField("min_confidence") else None,
            max_confidence=p.max_confidence if p.HasField("max_confidence") else None,
        )
    start = end = None
    if f.HasField("create_time"):
        if f.create_time.HasField("start_time"):
            start = _ns(f.create_time.start_time)
        if f.create_time.HasField("end_time"):
            end = _ns(f.create_time.end_time)
    return SearchRequest(
        filter=ImageFilter(
            datasets=tuple(f.datasets),
            labels=tuple(f.labels),
            tags=tuple(f.tags),
            attributes=tuple(sorted(f.attributes.items())),
            create_start_ns=start,
            create_end_ns=end,
            prediction=prediction,
            names=tuple(f.names),
        ),
        text=r.text,
        order_by=r.order_by,
        page_size=r.page_size,
        page_token=r.page_token,
        count_by=_COUNT_FIELDS.get(r.count_by),
    )
