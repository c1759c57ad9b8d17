"""The search domain's values: documents, predictions, queries, pages and write results.

These are plain frozen dataclasses with no transport in them; `search_service.convert` maps
them to and from protobuf. Times are integer nanoseconds since the Unix epoch, so both
backends store and compare exactly the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "MAX_BATCH",
    "MAX_FILTER_NAMES",
    "MAX_PAGE_SIZE",
    "DEFAULT_PAGE_SIZE",
    "ClassScore",
    "CountField",
    "ImageFilter",
    "ImageRecord",
    "ItemFailure",
    "PredictionFilter",
    "PredictionRecord",
    "ResolvedQuery",
    "SearchPage",
    "SearchRequest",
    "SortField",
    "SortKey",
    "WriteResult",
]

MAX_BATCH = 10_000
MAX_FILTER_NAMES = 1_000
MAX_PAGE_SIZE = 1_000
DEFAULT_PAGE_SIZE = 50


@dataclass(frozen=True)
class ClassScore:
    """One class and the probability a model gave it."""

    class_name: str
    class_index: int
    probability: float


@dataclass(frozen=True)
class PredictionRecord:
    """What one model version said about one image (the latest such prediction)."""

    model_version: str
    top_class: str
    confidence: float
    top_classes: tuple[ClassScore, ...] = ()
    predict_time_ns: int | None = None
    probabilities_array: str = ""


@dataclass(frozen=True)
class ImageRecord:
    """One image's document. Empty strings mean "not known"; they are stored as such."""

    name: str
    filename: str = ""
    dataset: str = "default"
    label: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    content_type: str = ""
    size_bytes: int = 0
    width: int = 0
    height: int = 0
    create_time_ns: int = 0
    # At most one per model version, ordered by model version (both backends return this order).
    predictions: tuple[PredictionRecord, ...] = ()


class CountField(StrEnum):
    """What matching documents can be counted by."""

    LABEL = "label"
    PREDICTED_CLASS = "predicted_class"
    DATASET = "dataset"


class SortField(StrEnum):
    """The fields a search can be ordered by."""

    CREATE_TIME = "create_time"
    FILENAME = "filename"
    SIZE_BYTES = "size_bytes"
    DATASET = "dataset"
    LABEL = "label"
    CONFIDENCE = "confidence"
    RELEVANCE = "relevance"


@dataclass(frozen=True)
class SortKey:
    """One ordering key; the name (ascending) always breaks the remaining ties."""

    field: SortField
    descending: bool


@dataclass(frozen=True)
class PredictionFilter:
    """All set parts must hold for the same prediction."""

    model_version: str = ""
    classes: tuple[str, ...] = ()
    min_confidence: float | None = None
    max_confidence: float | None = None


@dataclass(frozen=True)
class ImageFilter:
    """Filters on documents: set parts are ANDed, values within one part ORed (tags ANDed)."""

    datasets: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()
    create_start_ns: int | None = None
    create_end_ns: int | None = None
    prediction: PredictionFilter | None = None
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchRequest:
    """A search as the client asked for it, not yet validated."""

    filter: ImageFilter = field(default_factory=ImageFilter)
    text: str = ""
    order_by: str = ""
    page_size: int = 0
    page_token: str = ""
    count_by: CountField | None = None


@dataclass(frozen=True)
class ResolvedQuery:
    """A validated search that a backend runs.

    `text_terms` is None when there is no text; an empty tuple means the text held no word
    at all (e.g. `*:*`), which matches nothing, literally.
    """

    filter: ImageFilter
    text_terms: tuple[str, ...] | None
    order: tuple[SortKey, ...]
    count_by: CountField | None


@dataclass
class SearchPage:
    """One page of results; `next_position` is backend-specific and None on the last page."""

    documents: list[ImageRecord]
    total: int
    counts: list[tuple[str, int]]
    next_position: dict[str, Any] | None


@dataclass(frozen=True)
class ItemFailure:
    """Why one item of a bulk write was not applied."""

    name: str
    code: str
    reason: str
    message: str


@dataclass
class WriteResult:
    """How many items of a bulk write were applied, and why the others were not."""

    applied: int
    failures: list[ItemFailure] = field(default_factory=list)
