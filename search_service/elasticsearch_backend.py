"""The Elasticsearch 8 search backend (official `elasticsearch` 8.19 client).

The client is the blocking one, run on a dedicated thread pool: this environment has neither
aiohttp nor httpx (what `AsyncElasticsearch` needs), urllib3's connection pool is thread-safe,
`helpers.streaming_bulk` gives the same chunking and 429 retries, and one thread hop costs
tens of microseconds, far below a search's round trip.

Writes: documents go in with `create` (the fast path for new images); those that already
exist are rewritten keeping their predictions, and predictions are merged in (replacing the
entry of the same model version), both by optimistic concurrency: read with the sequence
number, write back with `if_seq_no`/`if_primary_term`, re-read on a conflict. No painless
script: the integ-test server distribution the engines run has no `lang-painless` module,
and this way works on any Elasticsearch 8. Rejections with 429/502/503/504 are retried with
exponential backoff, per item by the bulk helper and per request by the transport.

Searches: typed filters in filter context; free text only as already-split words (see
`search_service.text`) in a `match` query with `operator: and` on `search_text`, so no user
syntax reaches a query parser. The first page is a plain search; when there is more, the next
page opens a point in time and every later page reads that same snapshot with
`search_after` on the sort values (name breaks ties). A point in time that has expired or
been closed makes the page token INVALID_ARGUMENT, saying so.

Elasticsearch unreachable: every call raises `Unavailable` naming the URL; setup (template,
index, alias) is retried on each call until it succeeds, so the service recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

from elasticsearch import ApiError, Elasticsearch, NotFoundError, TransportError, helpers

from imagemesh.config import ElasticsearchSettings
from imagemesh.errors import InvalidArgument, ResourceExhausted, Unavailable
from imagemesh.names import image_sha256
from search_service.elasticsearch_mapping import (
    alias_name,
    index_name,
    index_template,
    template_name,
)
from search_service.model import (
    ClassScore,
    CountField,
    ImageRecord,
    ItemFailure,
    PredictionRecord,
    ResolvedQuery,
    SearchPage,
    SortField,
    WriteResult,
)
from search_service.text import document_words

__all__ = ["ElasticsearchBackend", "format_ns", "parse_ns"]

_T = TypeVar("_T")

_RETRY_STATUSES = (429, 502, 503, 504)
_MAX_COUNT_VALUES = 1000

# Rounds of re-reading a document that another writer changed between read and write.
_MAX_CONFLICT_ROUNDS = 5

_EPOCH_ORDINAL = datetime(1970, 1, 1).toordinal()

# The client's own JSON settings (compact, UTF-8 kept as is), for sources encoded here once.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

_SORT_FIELDS = {
    SortField.CREATE_TIME: "create_time",
    SortField.FILENAME: "filename.keyword",
    SortField.SIZE_BYTES: "size_bytes",
    SortField.DATASET: "dataset",
    SortField.LABEL: "label",
}


def format_ns(ns: int) -> str:
    """Nanoseconds since the epoch as the ISO 8601 text `date_nanos` stores exactly."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}Z"


def parse_ns(text: str) -> int:
    """The inverse of `format_ns`."""
    base, _, fraction = text.rstrip("Z").partition(".")
    # fromisoformat and day ordinals: exact, and several times cheaper than strptime, which
    # matters because every document a search returns carries one or more times.
    moment = datetime.fromisoformat(base)
    seconds = (
        (moment.toordinal() - _EPOCH_ORDINAL) * 86_400
        + moment.hour * 3_600
        + moment.minute * 60
        + moment.second
    )
    return seconds * 1_000_000_000 + int((fraction or "0").ljust(9, "0")[:9])


def _source(doc: ImageRecord, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": doc.name,
        "filename": doc.filename,
        "dataset": doc.dataset,
        "label": doc.label,
        "tags": list(doc.tags),
        "attributes": doc.attributes,
        "attribute_pairs": [f"{k}={v}" for k, v in sorted(doc.attributes.items())],
        "content_type": doc.content_type,
        "size_bytes": doc.size_bytes,
        "width": doc.width,
        "height": doc.height,
        "create_time": format_ns(doc.create_time_ns),
        "search_text": document_words(doc.filename, doc.tags),
        "predictions": predictions,
    }


def _encoded_pair(action: Any) -> Any:
    """`expand_action_callback` for actions already encoded as (action line, source line).

    The bulk helper passes bytes lines through untouched, also when it retries them.
    """
    return action


def _prediction_source(p: PredictionRecord) -> dict[str, Any]:
    source: dict[str, Any] = {
        "model_version": p.model_version,
        "top_class": p.top_class,
        "confidence": p.confidence,
        "top_k": [
            {"class_name": s.class_name, "class_index": s.class_index, "probability": s.probability}
            for s in p.top_classes
        ],
        "probabilities_array": p.probabilities_array,
    }
    if p.predict_time_ns is not None:
        source["predict_time"] = format_ns(p.predict_time_ns)
    return source


def _prediction_record(p: dict[str, Any]) -> PredictionRecord:
    return PredictionRecord(
        model_version=p["model_version"],
        top_class=p["top_class"],
        confidence=float(p["confidence"]),
        top_classes=tuple(
            ClassScore(s["class_name"], int(s["class_index"]), float(s["probability"]))
            for s in p.get("top_k", ())
        ),
        predict_time_ns=parse_ns(p["predict_time"]) if p.get("predict_time") else None,
        probabilities_array=p.get("probabilities_array", ""),
    )


def _model_version(p: PredictionRecord) -> str:
    return p.model_version


def _record(source: dict[str, Any]) -> ImageRecord:
    predictions = [_prediction_record(p) for p in source.get("predictions") or ()]
    if len(predictions) > 1:
        predictions.sort(key=_model_version)
    return ImageRecord(
        name=source["name"],
        filename=source["filename"],
        dataset=source["dataset"],
        label=source["label"],
        tags=tuple(source["tags"]),
        attributes=dict(source["attributes"]),
        content_type=source["content_type"],
        size_bytes=int(source["size_bytes"]),
        width=int(source["width"]),
        height=int(source["height"]),
        create_time_ns=parse_ns(source["create_time"]),
        predictions=tuple(predictions),
    )


def _prediction_clauses(query: ResolvedQuery) -> list[dict[str, Any]]:
    pred = query.filter.prediction
    clauses: list[dict[str, Any]] = []
    if pred is None:
        return clauses
    if pred.model_version:
        clauses.append({"term": {"predictions.model_version": pred.model_version}})
    if pred.classes:
        clauses.append({"terms": {"predictions.top_class": list(pred.classes)}})
    bounds: dict[str, float] = {}
    if pred.min_confidence is not None:
        bounds["gte"] = pred.min_confidence
    if pred.max_confidence is not None:
        bounds["lte"] = pred.max_confidence
    if bounds:
        clauses.append({"range": {"predictions.confidence": bounds}})
    return clauses


def build_query(query: ResolvedQuery) -> dict[str, Any]:
    """The `query` of a search: typed filters, plus the literal words when there is text."""
    flt = query.filter
    filters: list[dict[str, Any]] = []
    must: list[dict[str, Any]] = []
    if flt.datasets:
        filters.append({"terms": {"dataset": list(flt.datasets)}})
    if flt.labels:
        filters.append({"terms": {"label": list(flt.labels)}})
    if flt.names:
        filters.append({"terms": {"name": list(flt.names)}})
    filters.extend({"term": {"tags.keyword": tag}} for tag in flt.tags)
    filters.extend({"term": {"attribute_pairs": f"{k}={v}"}} for k, v in flt.attributes)
    bounds: dict[str, Any] = {}
    if flt.create_start_ns is not None:
        bounds["gte"] = format_ns(flt.create_start_ns)
    if flt.create_end_ns is not None:
        bounds["lte"] = format_ns(flt.create_end_ns)
    if bounds:
        bounds["format"] = "strict_date_optional_time_nanos"
        filters.append({"range": {"create_time": bounds}})
    if flt.prediction is not None:
        filters.append(
            {
                "nested": {
                    "path": "predictions",
                    "query": {"bool": {"filter": _prediction_clauses(query)}},
                }
            }
        )
    if query.text_terms is not None:
        if not query.text_terms:
            return {"match_none": {}}
        match = {"match": {"search_text": {"query": " ".join(query.text_terms), "operator": "and"}}}
        # Scored only when ordered by relevance; otherwise a cacheable filter.
        if any(k.field is SortField.RELEVANCE for k in query.order):
            must.append(match)
        else:
            filters.append(match)
    return {"bool": {"filter": filters, "must": must}}


def build_sort(query: ResolvedQuery) -> list[dict[str, Any]]:
    """The sort of a search; the name breaks ties so search_after is exact."""
    sort: list[dict[str, Any]] = []
    for key in query.order:
        order = "desc" if key.descending else "asc"
        if key.field is SortField.RELEVANCE:
            sort.append({"_score": {"order": order}})
        elif key.field is SortField.CONFIDENCE:
            assert query.filter.prediction is not None
            version = query.filter.prediction.model_version
            sort.append(
                {
                    "predictions.confidence": {
                        "order": order,
                        "nested": {
                            "path": "predictions",
                            "filter": {"term": {"predictions.model_version": version}},
                        },
                    }
                }
            )
        else:
            sort.append({_SORT_FIELDS[key.field]: {"order": order}})
    sort.append({"name": {"order": "asc"}})
    return sort


def build_aggs(query: ResolvedQuery) -> dict[str, Any] | None:
    """The aggregation counting matches per value of `count_by`, if any."""
    if query.count_by is None:
        return None
    if query.count_by is CountField.PREDICTED_CLASS:
        clauses = _prediction_clauses(query)
        matched = {"bool": {"filter": clauses}} if clauses else {"match_all": {}}
        return {
            "counts": {
                "nested": {"path": "predictions"},
                "aggs": {
                    "matched": {
                        "filter": matched,
                        "aggs": {
                            "values": {
                                "terms": {
                                    "field": "predictions.top_class",
                                    "size": _MAX_COUNT_VALUES,
                                },
                                # Documents, not predictions: one image counts once per class.
                                "aggs": {"images": {"reverse_nested": {}}},
                            }
                        },
                    }
                },
            }
        }
    field = "label" if query.count_by is CountField.LABEL else "dataset"
    return {"counts": {"terms": {"field": field, "size": _MAX_COUNT_VALUES, "exclude": [""]}}}


def _read_counts(query: ResolvedQuery, aggregations: dict[str, Any]) -> list[tuple[str, int]]:
    if query.count_by is None:
        return []
    if query.count_by is CountField.PREDICTED_CLASS:
        buckets = aggregations["counts"]["matched"]["values"]["buckets"]
        return [(str(b["key"]), int(b["images"]["doc_count"])) for b in buckets]
    return [(str(b["key"]), int(b["doc_count"])) for b in aggregations["counts"]["buckets"]]


def _is_missing_pit(exc: ApiError) -> bool:
    text = str(exc.body) if exc.body else str(exc)
    return "search_context_missing" in text or "No search context found" in text


class ElasticsearchBackend:
    """A `SearchBackend` on an Elasticsearch 8 cluster."""

    def __init__(self, settings: ElasticsearchSettings, *, pit_keep_alive_s: float) -> None:
        self._settings = settings
        self._url = settings.url
        self.alias = alias_name(settings.index_prefix)
        auth = (
            (settings.username, settings.password or "") if settings.username is not None else None
        )
        self.client = Elasticsearch(
            settings.url,
            basic_auth=auth,
            request_timeout=settings.request_timeout_s,
            max_retries=settings.max_retries,
            retry_on_status=_RETRY_STATUSES,
            retry_on_timeout=True,
            connections_per_node=settings.workers,
        )
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="search-es")
        self._keep_alive = f"{int(pit_keep_alive_s)}s"
        self._create_prefix = f'{{"create":{{"_index":{json.dumps(self.alias)},"_id":"'.encode()
        self._ready = False
        self._setup_lock = threading.Lock()

    @property
    def description(self) -> str:
        """Where the cluster is."""
        return f"Elasticsearch at {self._url}"

    # -- plumbing -------------------------------------------------------------------------

    def _map_error(self, exc: Exception) -> Exception:
        if isinstance(exc, ApiError):
            status = exc.meta.status
            if status == 429:
                return ResourceExhausted(
                    f"Elasticsearch at {self._url} is overloaded (429 Too Many Requests); "
                    "retry later",
                    reason="BACKEND_OVERLOADED",
                    retry_after_s=1.0,
                )
            if status >= 500:
                return Unavailable(
                    f"Elasticsearch at {self._url} failed ({status} {exc.message}); retry later"
                )
            return exc
        if isinstance(exc, TransportError):
            return Unavailable(
                f"Elasticsearch at {self._url} is down or unreachable "
                f"({type(exc).__name__}: {exc.message}); retry later"
            )
        return exc

    async def _call(self, fn: Callable[[], _T]) -> _T:
        def call() -> _T:
            try:
                self._ensure_ready()
                return fn()
            except (ApiError, TransportError) as exc:
                mapped = self._map_error(exc)
                if mapped is exc:
                    raise
                raise mapped from exc

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _ensure_ready(self) -> None:
        """Template, index and alias exist; retried on every call until it once succeeds."""
        if self._ready:
            return
        with self._setup_lock:
            if self._ready:
                return
            prefix = self._settings.index_prefix
            body = index_template(
                prefix,
                shards=self._settings.number_of_shards,
                replicas=self._settings.number_of_replicas,
            )
            self.client.indices.put_index_template(name=template_name(prefix), **body)
            if not self.client.indices.exists_alias(name=self.alias):
                try:
                    self.client.indices.create(
                        index=index_name(prefix),
                        aliases={self.alias: {"is_write_index": True}},
                        wait_for_active_shards="1",
                    )
                except ApiError as exc:
                    # Another instance created it first: that is the same outcome.
                    if exc.meta.status != 400 or "already_exists" not in str(exc.body):
                        raise
            self._ready = True

    def _bulk(
        self,
        actions: Iterable[Any],
        *,
        wait: bool,
        encoded: bool = False,
    ) -> list[tuple[bool, dict[str, Any]]]:
        """Sends the actions: helper dicts, or (action line, source line) bytes when `encoded`."""
        results: list[tuple[bool, dict[str, Any]]] = []
        for ok, item in helpers.streaming_bulk(
            self.client,
            actions,
            expand_action_callback=_encoded_pair if encoded else helpers.expand_action,
            chunk_size=self._settings.bulk_chunk_size,
            max_retries=self._settings.max_retries,
            initial_backoff=self._settings.initial_backoff_s,
            max_backoff=self._settings.max_backoff_s,
            retry_on_status=_RETRY_STATUSES,
            raise_on_error=False,
            raise_on_exception=True,
            refresh="wait_for" if wait else False,
        ):
            op = next(iter(item.values()))
            results.append((ok, op))
        return results

    async def start(self) -> None:
        """Sets up template, index and alias; if the cluster is down, later calls retry."""
        # When down, the service still serves and answers UNAVAILABLE until the cluster is back.
        with contextlib.suppress(Unavailable):
            await self._call(lambda: None)

    async def close(self) -> None:
        """Closes the connections and the threads."""
        self._pool.shutdown(wait=True)
        self.client.close()

    # -- writes ---------------------------------------------------------------------------

    def _read_modify_write(
        self,
        ids: Sequence[str],
        modify: Callable[[str, dict[str, Any] | None], dict[str, Any] | ItemFailure],
        *,
        wait: bool,
    ) -> list[ItemFailure]:
        """Rewrites documents from their current source, safely under concurrent writers.

        Each document is read with its sequence number and written back only if nobody
        wrote it in between (`if_seq_no`/`if_primary_term`); a conflict re-reads and retries.
        `modify` gets the current source (None when missing) and returns the new source, or
        the failure to report.
        """
        failures: list[ItemFailure] = []
        pending = list(ids)
        for _ in range(_MAX_CONFLICT_ROUNDS):
            if not pending:
                return failures
            actions: list[dict[str, Any]] = []
            for start in range(0, len(pending), self._settings.bulk_chunk_size):
                chunk = pending[start : start + self._settings.bulk_chunk_size]
                response = self.client.mget(index=self.alias, ids=chunk)
                for doc in response["docs"]:
                    found = bool(doc.get("found"))
                    new = modify(doc["_id"], doc["_source"] if found else None)
                    if isinstance(new, ItemFailure):
                        failures.append(new)
                        continue
                    action: dict[str, Any] = {
                        "_index": self.alias,
                        "_id": doc["_id"],
                        "_source": new,
                    }
                    if found:
                        action["if_seq_no"] = doc["_seq_no"]
                        action["if_primary_term"] = doc["_primary_term"]
                    else:
                        action["_op_type"] = "create"
                    actions.append(action)
            pending = []
            for ok, op in self._bulk(actions, wait=wait):
                if ok:
                    continue
                if op.get("status") == 409:
                    pending.append(op["_id"])  # written meanwhile: read again
                else:
                    failures.append(_item_failure(op["_id"], op))
        failures.extend(
            ItemFailure(
                doc_id,
                "ABORTED",
                "CONCURRENT_UPDATES",
                "the document kept changing under concurrent writes; retry the item",
            )
            for doc_id in pending
        )
        return failures

    async def index_images(self, documents: Sequence[ImageRecord], *, wait: bool) -> WriteResult:
        """`create` for new documents; existing ones are rewritten keeping their predictions."""
        by_id = {image_sha256(d.name): d for d in documents}

        def keep_predictions(doc_id: str, current: dict[str, Any] | None) -> dict[str, Any]:
            kept = (current or {}).get("predictions") or []
            return _source(by_id[doc_id], kept)

        def write() -> WriteResult:
            failures: list[ItemFailure] = []
            existing: list[str] = []
            # Each line is encoded once, here, in one call per document: the helper's generic
            # path (expand, then serialize the action and the source) costs about as much again.
            # Ids are validated hex digits, so they need no escaping.
            created = self._bulk(
                (
                    (
                        self._create_prefix + doc_id.encode() + b'"}}',
                        _JSON.encode(_source(doc, [])).encode("utf-8", "surrogatepass"),
                    )
                    for doc_id, doc in by_id.items()
                ),
                wait=wait,
                encoded=True,
            )
            for ok, op in created:
                if ok:
                    continue
                if op.get("status") == 409:
                    existing.append(op["_id"])
                else:
                    failures.append(_item_failure(op["_id"], op))
            if existing:
                failures.extend(self._read_modify_write(existing, keep_predictions, wait=wait))
            named = [dataclasses.replace(f, name=by_id[f.name].name) for f in failures]
            return WriteResult(len(documents) - len(named), named)

        return await self._call(write)

    async def index_predictions(
        self, predictions: Sequence[tuple[str, Sequence[PredictionRecord]]], *, wait: bool
    ) -> WriteResult:
        """Each image's predictions replace those of the same model versions."""
        names = {image_sha256(name): name for name, _ in predictions}
        new = {image_sha256(name): preds for name, preds in predictions}

        def merge(doc_id: str, current: dict[str, Any] | None) -> dict[str, Any] | ItemFailure:
            if current is None:
                return _unknown_image(names[doc_id])
            versions = {p.model_version for p in new[doc_id]}
            kept = [
                p for p in current.get("predictions") or [] if p["model_version"] not in versions
            ]
            return {**current, "predictions": kept + [_prediction_source(p) for p in new[doc_id]]}

        def write() -> WriteResult:
            failures = self._read_modify_write(list(new), merge, wait=wait)
            for i, failure in enumerate(failures):
                if failure.name in names:
                    failures[i] = dataclasses.replace(failure, name=names[failure.name])
            failed = {f.name for f in failures}
            applied = sum(len(preds) for name, preds in predictions if name not in failed)
            return WriteResult(applied, failures)

        return await self._call(write)

    async def delete_images(self, names: Sequence[str], *, wait: bool) -> int:
        """Deletes by id; counts those that existed."""

        def write() -> int:
            results = self._bulk(
                (
                    {"_op_type": "delete", "_index": self.alias, "_id": image_sha256(name)}
                    for name in names
                ),
                wait=wait,
            )
            return sum(1 for ok, op in results if ok and op.get("result") == "deleted")

        return await self._call(write)

    # -- reads ----------------------------------------------------------------------------

    async def get_image(self, name: str) -> ImageRecord | None:
        """One document by id (real-time: sees writes not yet refreshed)."""

        def read() -> ImageRecord | None:
            try:
                response = self.client.get(index=self.alias, id=image_sha256(name))
            except NotFoundError:
                return None
            return _record(response["_source"])

        return await self._call(read)

    async def search(
        self, query: ResolvedQuery, page_size: int, position: dict[str, Any] | None
    ) -> SearchPage:
        """One page; the point in time is opened for the second page and reused after."""

        def read() -> SearchPage:
            sort = build_sort(query)
            body: dict[str, Any] = {
                "query": build_query(query),
                "sort": sort,
                "size": page_size + 1,
                "track_total_hits": True,
                # The whole source, though attribute_pairs and search_text are not read:
                # filtering it costs Elasticsearch a parse and rewrite of every hit.
            }
            aggs = build_aggs(query)
            if aggs:
                body["aggs"] = aggs
            pit_id: str | None = None
            if position is not None:
                after = position.get("after")
                if not isinstance(after, list) or len(after) != len(sort):
                    raise InvalidArgument(
                        "page_token does not fit this query; start again with an empty one",
                        reason="INVALID_PAGE_TOKEN",
                        field="page_token",
                    )
                pit_id = (
                    position.get("pit")
                    or self.client.open_point_in_time(
                        index=self.alias, keep_alive=self._keep_alive
                    )["id"]
                )
                body["pit"] = {"id": pit_id, "keep_alive": self._keep_alive}
                body["search_after"] = after
            try:
                if pit_id is not None:
                    response = self.client.search(**body)
                else:
                    response = self.client.search(index=self.alias, **body)
            except ApiError as exc:
                if pit_id is not None and _is_missing_pit(exc):
                    raise InvalidArgument(
                        "page_token's point in time has expired or was closed on "
                        "Elasticsearch (the cursor was idle too long); start again with an "
                        "empty page_token",
                        reason="EXPIRED_PAGE_TOKEN",
                        field="page_token",
                    ) from exc
                raise
            hits = response["hits"]["hits"]
            page_hits = hits[:page_size]
            next_position = None
            new_pit = response.get("pit_id", pit_id)
            if len(hits) > page_size:
                next_position = {"after": page_hits[-1]["sort"], "pit": new_pit}
            elif new_pit is not None:
                self._close_pit(new_pit)
            return SearchPage(
                documents=[_record(h["_source"]) for h in page_hits],
                total=int(response["hits"]["total"]["value"]),
                counts=_read_counts(query, response.get("aggregations", {})),
                next_position=next_position,
            )

        return await self._call(read)

    def _close_pit(self, pit_id: str) -> None:
        # Best effort: an unclosed point in time expires by itself after its keep-alive.
        with contextlib.suppress(ApiError, TransportError):
            self.client.close_point_in_time(id=pit_id)


def _unknown_image(name: str) -> ItemFailure:
    return ItemFailure(
        name, "NOT_FOUND", "IMAGE_NOT_INDEXED", f"no image document named {name}; index it first"
    )


def _item_failure(name: str, op: dict[str, Any]) -> ItemFailure:
    status = int(op.get("status", 500))
    error = op.get("error") or {}
    kind = error.get("type", "error") if isinstance(error, dict) else str(error)
    detail = error.get("reason", "") if isinstance(error, dict) else ""
    if status == 404:
        return _unknown_image(name)
    if status == 429:
        return ItemFailure(
            name,
            "RESOURCE_EXHAUSTED",
            "BACKEND_OVERLOADED",
            "Elasticsearch rejected the item as overloaded after retries; retry it later",
        )
    if status >= 500:
        return ItemFailure(
            name, "UNAVAILABLE", "BACKEND_UNAVAILABLE", f"Elasticsearch failed: {kind} {detail}"
        )
    return ItemFailure(
        name,
        "INVALID_ARGUMENT",
        "REJECTED_BY_BACKEND",
        f"Elasticsearch rejected it: {kind} {detail}",
    )
