"""The interface every search backend implements (Elasticsearch, SQLite).

Backends receive validated values only (see `search_service.service`): names are well
formed, ranges ordered, page sizes within limits. They must give the same answers for the
same data: the same documents in the same order (ties broken by name ascending), the same
totals and the same per-value counts (most frequent first, ties by value ascending, empty
values not counted). Every backend raises `imagemesh.errors.Unavailable` when its engine
cannot be reached, and recovers by itself once the engine is back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from search_service.model import (
    ImageRecord,
    PredictionRecord,
    ResolvedQuery,
    SearchPage,
    WriteResult,
)

__all__ = ["SearchBackend"]


class SearchBackend(Protocol):
    """Stores image documents with their predictions and answers searches over them."""

    @property
    def description(self) -> str:
        """A short human description, e.g. `Elasticsearch at http://...`."""
        ...

    async def start(self) -> None:
        """Prepares the backend (schema, index template, alias). Must not fail only
        because the engine is down: it then retries on the next call."""
        ...

    async def close(self) -> None:
        """Releases connections and threads."""
        ...

    async def index_images(self, documents: Sequence[ImageRecord], *, wait: bool) -> WriteResult:
        """Inserts or replaces documents' metadata, keeping their predictions.

        `documents` have distinct names. With `wait`, returns once searches see the writes.
        """
        ...

    async def index_predictions(
        self, predictions: Sequence[tuple[str, Sequence[PredictionRecord]]], *, wait: bool
    ) -> WriteResult:
        """Records predictions per image name (distinct names), each replacing the image's
        prediction by the same model version; an unknown image is a NOT_FOUND failure."""
        ...

    async def delete_images(self, names: Sequence[str], *, wait: bool) -> int:
        """Removes documents; returns how many existed."""
        ...

    async def get_image(self, name: str) -> ImageRecord | None:
        """One document, or None."""
        ...

    async def search(
        self, query: ResolvedQuery, page_size: int, position: dict[str, Any] | None
    ) -> SearchPage:
        """One page of `query` after `position` (None for the first page).

        `position` is what a previous page of the same query returned as `next_position`;
        a position the backend can no longer honour raises `InvalidArgument`.
        """
        ...
