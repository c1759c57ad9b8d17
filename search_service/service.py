"""The search domain: validates requests, runs them on a backend, signs cursors.

Every check on user input lives here, before a backend is touched, so each backend sees only
well-formed values and a bad request leaves nothing half-written. Bulk writes validate each
item: bad items are reported per item and the valid rest is applied.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from imagemesh.errors import InvalidArgument, NotFound
from imagemesh.names import array_key, image_sha256, parse_model_version, validate_dataset
from imagemesh.page_tokens import PageTokenCodec
from search_service.backend import SearchBackend
from search_service.model import (
    DEFAULT_PAGE_SIZE,
    MAX_BATCH,
    MAX_FILTER_NAMES,
    MAX_PAGE_SIZE,
    ImageFilter,
    ImageRecord,
    ItemFailure,
    PredictionRecord,
    ResolvedQuery,
    SearchPage,
    SearchRequest,
    SortField,
    SortKey,
    WriteResult,
)
from search_service.text import MAX_TEXT_CHARS, words

__all__ = ["MAX_NS", "SearchDomain", "parse_order_by"]

# date_nanos (Elasticsearch) covers 1970 to 2262; both backends accept exactly that range.
MAX_NS = 2**63 - 1
_MAX_FIELD_CHARS = 1024
_MAX_TAGS = 256
_MAX_ATTRIBUTES = 64
_ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DEFAULT_ORDER = (SortKey(SortField.CREATE_TIME, descending=True),)


def parse_order_by(order_by: str, *, has_text: bool, model_version: str) -> tuple[SortKey, ...]:
    """The sort keys of `field [asc|desc], ...`; raises `InvalidArgument` naming the problem."""
    if not order_by.strip():
        return _DEFAULT_ORDER
    keys: list[SortKey] = []
    allowed = ", ".join(f.value for f in SortField)
    for part in order_by.split(","):
        tokens = part.split()
        if not tokens or len(tokens) > 2:
            raise InvalidArgument(
                f"order_by must be a comma-separated list of 'field [asc|desc]', got "
                f"{order_by[:200]!r}",
                reason="INVALID_ORDER_BY",
                field="order_by",
            )
        try:
            sort_field = SortField(tokens[0])
        except ValueError:
            raise InvalidArgument(
                f"order_by names unknown field {tokens[0][:100]!r}; allowed: {allowed}",
                reason="INVALID_ORDER_BY",
                field="order_by",
            ) from None
        direction = tokens[1].lower() if len(tokens) == 2 else None
        if direction not in (None, "asc", "desc"):
            raise InvalidArgument(
                f"order_by direction must be asc or desc, got {tokens[1][:20]!r}",
                reason="INVALID_ORDER_BY",
                field="order_by",
            )
        if any(k.field == sort_field for k in keys):
            raise InvalidArgument(
                f"order_by names {sort_field.value} twice",
                reason="INVALID_ORDER_BY",
                field="order_by",
            )
        if sort_field is SortField.RELEVANCE and not has_text:
            raise InvalidArgument(
                "order_by relevance needs text to be relevant to; set text or order by "
                "another field",
                reason="INVALID_ORDER_BY",
                field="order_by",
            )
        if sort_field is SortField.CONFIDENCE and not model_version:
            raise InvalidArgument(
                "order_by confidence needs filter.prediction.model_version: confidences of "
                "different model versions are not comparable",
                reason="INVALID_ORDER_BY",
                field="order_by",
            )
        # Relevance reads best-first unless asked otherwise; every other field ascends.
        default_desc = sort_field is SortField.RELEVANCE
        keys.append(SortKey(sort_field, default_desc if direction is None else direction == "desc"))
    return tuple(keys)


def _check_text(value: str, field: str, *, limit: int = _MAX_FIELD_CHARS) -> None:
    if len(value) > limit:
        raise InvalidArgument(
            f"{field} is {len(value)} characters; at most {limit} are allowed",
            reason="FIELD_TOO_LONG",
            field=field,
        )


def _check_confidence(value: float | None, field: str) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise InvalidArgument(
            f"{field} must be within [0, 1], got {value}",
            reason="CONFIDENCE_OUT_OF_RANGE",
            field=field,
        )


def _check_time(value: int | None, field: str) -> None:
    if value is not None and not 0 <= value <= MAX_NS:
        raise InvalidArgument(
            f"{field} must be between 1970-01-01 and 2262-04-11 (the range searches can store)",
            reason="TIME_OUT_OF_RANGE",
            field=field,
        )


def _validate_document(doc: ImageRecord, now_ns: int) -> ImageRecord:
    image_sha256(doc.name)
    _check_text(doc.filename, "filename")
    _check_text(doc.label, "label", limit=256)
    _check_text(doc.content_type, "content_type", limit=256)
    if len(doc.tags) > _MAX_TAGS:
        raise InvalidArgument(
            f"a document has at most {_MAX_TAGS} tags", reason="TOO_MANY_TAGS", field="tags"
        )
    for tag in doc.tags:
        _check_text(tag, "tags", limit=256)
    if len(doc.attributes) > _MAX_ATTRIBUTES:
        raise InvalidArgument(
            f"a document has at most {_MAX_ATTRIBUTES} attributes",
            reason="TOO_MANY_ATTRIBUTES",
            field="attributes",
        )
    for key, value in doc.attributes.items():
        _check_attribute_key(key, "attributes")
        _check_text(value, f"attributes[{key}]", limit=256)
    if doc.size_bytes < 0 or doc.width < 0 or doc.height < 0:
        raise InvalidArgument(
            "size_bytes, width and height cannot be negative",
            reason="NEGATIVE_SIZE",
            field="size_bytes",
        )
    _check_time(doc.create_time_ns or None, "create_time")
    # Built field by field: dataclasses.replace costs twice as much, once per document.
    return ImageRecord(
        name=doc.name,
        filename=doc.filename,
        dataset=validate_dataset(doc.dataset),
        label=doc.label,
        tags=tuple(dict.fromkeys(doc.tags)),
        attributes=doc.attributes,
        content_type=doc.content_type,
        size_bytes=doc.size_bytes,
        width=doc.width,
        height=doc.height,
        # An unset creation time is the time the document is indexed, so every document
        # has one and time filters and ordering never meet a missing value.
        create_time_ns=doc.create_time_ns or now_ns,
        predictions=(),  # output only: set through IndexPredictions
    )


def _check_attribute_key(key: str, field: str) -> None:
    if not _ATTRIBUTE_KEY.fullmatch(key):
        raise InvalidArgument(
            f"{field} keys must be 1-128 characters of [A-Za-z0-9._-] starting with a letter "
            f"or digit, got {key[:100]!r}",
            reason="INVALID_ATTRIBUTE_KEY",
            field=field,
        )


def _validate_prediction(image: str, prediction: PredictionRecord) -> None:
    image_sha256(image, field="image")
    parse_model_version(prediction.model_version, field="prediction.model_version")
    if not prediction.top_class:
        raise InvalidArgument(
            "prediction.top_class is required",
            reason="MISSING_TOP_CLASS",
            field="prediction.top_class",
        )
    _check_text(prediction.top_class, "prediction.top_class", limit=256)
    _check_confidence(prediction.confidence, "prediction.confidence")
    for score in prediction.top_classes:
        _check_confidence(score.probability, "prediction.top_classes.probability")
    _check_time(prediction.predict_time_ns, "prediction.predict_time")
    if prediction.probabilities_array:
        array_key(prediction.probabilities_array, field="prediction.probabilities_array")


def _failure(name: str, error: InvalidArgument | NotFound) -> ItemFailure:
    return ItemFailure(name, error.code_name, error.reason, error.message)


def _check_batch(count: int, field: str) -> None:
    if count > MAX_BATCH:
        raise InvalidArgument(
            f"{field} holds {count} items; at most {MAX_BATCH:,} are allowed per call, "
            "split the batch",
            reason="BATCH_TOO_LARGE",
            field=field,
        )


def _validate_filter(flt: ImageFilter) -> ImageFilter:
    if len(flt.names) > MAX_FILTER_NAMES:
        raise InvalidArgument(
            f"filter.names holds {len(flt.names)} names; at most {MAX_FILTER_NAMES:,}",
            reason="TOO_MANY_NAMES",
            field="filter.names",
        )
    for name in flt.names:
        image_sha256(name, field="filter.names")
    for key, _ in flt.attributes:
        _check_attribute_key(key, "filter.attributes")
    _check_time(flt.create_start_ns, "filter.create_time.start_time")
    _check_time(flt.create_end_ns, "filter.create_time.end_time")
    if (
        flt.create_start_ns is not None
        and flt.create_end_ns is not None
        and flt.create_start_ns > flt.create_end_ns
    ):
        raise InvalidArgument(
            "filter.create_time.start_time is after end_time; swap them",
            reason="INVERTED_RANGE",
            field="filter.create_time",
        )
    pred = flt.prediction
    if pred is not None:
        if pred.model_version:
            parse_model_version(pred.model_version, field="filter.prediction.model_version")
        _check_confidence(pred.min_confidence, "filter.prediction.min_confidence")
        _check_confidence(pred.max_confidence, "filter.prediction.max_confidence")
        if (
            pred.min_confidence is not None
            and pred.max_confidence is not None
            and pred.min_confidence > pred.max_confidence
        ):
            raise InvalidArgument(
                "filter.prediction.min_confidence is above max_confidence; swap them",
                reason="INVERTED_RANGE",
                field="filter.prediction",
            )
    return flt


def _fingerprint(query: ResolvedQuery) -> str:
    # Identifies the query a token belongs to; page_size may change between pages. The repr
    # of these frozen dataclasses of strings, numbers, tuples and enums names every field
    # and value unambiguously, at a tenth of the cost of dataclasses.asdict and JSON.
    return repr(query)


class SearchDomain:
    """The SearchService's behaviour, over any `SearchBackend`."""

    def __init__(
        self, backend: SearchBackend, codec: PageTokenCodec, *, token_ttl_s: float
    ) -> None:
        self.backend = backend
        self._codec = codec
        self._token_ttl_s = token_ttl_s

    async def index_images(self, documents: Sequence[ImageRecord], *, wait: bool) -> WriteResult:
        """Indexes the valid documents; reports each invalid one as a failure."""
        _check_batch(len(documents), "documents")
        now_ns = time.time_ns()
        failures: list[ItemFailure] = []
        valid: dict[str, ImageRecord] = {}
        for doc in documents:
            try:
                checked = _validate_document(doc, now_ns)
            except InvalidArgument as exc:
                failures.append(_failure(doc.name, exc))
                continue
            # The last of several documents with one name wins, as if indexed in order.
            valid.pop(checked.name, None)
            valid[checked.name] = checked
        result = await self.backend.index_images(list(valid.values()), wait=wait)
        applied = len(documents) - len(failures) - len(result.failures)
        return WriteResult(applied, failures + result.failures)

    async def index_predictions(
        self, predictions: Sequence[tuple[str, PredictionRecord]], *, wait: bool
    ) -> WriteResult:
        """Records the valid predictions; reports each invalid or unknown one as a failure."""
        _check_batch(len(predictions), "predictions")
        failures: list[ItemFailure] = []
        by_image: dict[str, dict[str, PredictionRecord]] = {}
        for image, prediction in predictions:
            try:
                _validate_prediction(image, prediction)
            except InvalidArgument as exc:
                failures.append(_failure(image, exc))
                continue
            by_image.setdefault(image, {})[prediction.model_version] = prediction
        grouped = [(image, list(preds.values())) for image, preds in by_image.items()]
        result = await self.backend.index_predictions(grouped, wait=wait)
        failed_images = {f.name for f in result.failures}
        lost = sum(1 for image, _ in predictions if image in failed_images and image in by_image)
        # One failure per image from the backend, but every prediction of it was not recorded.
        applied = len(predictions) - len(failures) - lost
        return WriteResult(applied, failures + result.failures)

    async def delete_images(self, names: Sequence[str], *, wait: bool) -> int:
        """Removes documents; all names are checked before anything is removed."""
        _check_batch(len(names), "names")
        for name in names:
            image_sha256(name, field="names")
        return await self.backend.delete_images(list(dict.fromkeys(names)), wait=wait)

    async def get_image(self, name: str) -> ImageRecord:
        """One document; `NotFound` when there is none."""
        image_sha256(name)
        record = await self.backend.get_image(name)
        if record is None:
            raise NotFound(f"no image document named {name}; index it first")
        return record

    def resolve(self, request: SearchRequest) -> ResolvedQuery:
        """Validates a search request into the query a backend runs."""
        _check_text(request.text, "text", limit=MAX_TEXT_CHARS)
        flt = _validate_filter(request.filter)
        has_text = bool(request.text.strip())
        model_version = flt.prediction.model_version if flt.prediction else ""
        order = parse_order_by(request.order_by, has_text=has_text, model_version=model_version)
        return ResolvedQuery(
            filter=flt,
            text_terms=words(request.text) if has_text else None,
            order=order,
            count_by=request.count_by,
        )

    async def search(self, request: SearchRequest) -> tuple[SearchPage, str]:
        """A page of results and the token of the next page (empty on the last page)."""
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be between 1 and {MAX_PAGE_SIZE:,} (0 means "
                f"{DEFAULT_PAGE_SIZE}), got {request.page_size}",
                reason="PAGE_SIZE_OUT_OF_RANGE",
                field="page_size",
            )
        query = self.resolve(request)
        fingerprint = _fingerprint(query)
        position = (
            self._codec.decode(request.page_token, query=fingerprint)
            if request.page_token
            else None
        )
        page = await self.backend.search(query, request.page_size or DEFAULT_PAGE_SIZE, position)
        token = ""
        if page.next_position is not None:
            token = self._codec.encode(
                page.next_position, query=fingerprint, ttl_s=self._token_ttl_s
            )
        # Most frequent first, ties by value: the same order on every backend.
        page.counts.sort(key=lambda item: (-item[1], item[0]))
        return page, token
