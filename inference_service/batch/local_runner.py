"""Runs a job in the inference service's own process, for selections below the Spark threshold.

The names go through the same pipeline as on Spark (`pipeline.classify_names`), with this
process's copy of the model (loaded once, kept across jobs) and a cancellation checked between
batches. No Spark application is needed, so a small job starts in the time it takes to read its
first batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .indexer import PredictionIndexer, cached_indexer
from .pipeline import JobSpec, Outcome, Predictor, classify_names
from .predictor import cached_predictor, open_store_cached
from .runners import RunControl

__all__ = ["LocalRunner"]


class LocalRunner:
    """`JobRunner` in this process."""

    mode_name = "LOCAL"

    def __init__(
        self,
        predictor_for: Callable[[JobSpec], Predictor] | None = None,
        indexer_for: Callable[[JobSpec], PredictionIndexer] | None = None,
        store_for: Callable[[JobSpec], Any] | None = None,
    ) -> None:
        self._predictor_for = predictor_for or (
            lambda spec: cached_predictor(spec.model_version, spec.storage, spec.batch_size)
        )
        self._indexer_for = indexer_for or (
            lambda spec: cached_indexer(spec.search_address, spec.client)
        )
        self._store_for = store_for or (lambda spec: open_store_cached(spec.storage))

    def run(self, spec: JobSpec, names: Sequence[str], control: RunControl) -> Outcome:
        """Classifies `names` here; see `JobRunner.run`."""
        so_far = Outcome()

        def progress(step: Outcome) -> None:
            so_far.merge(step)
            control.report(so_far)

        return classify_names(
            names,
            spec,
            self._predictor_for(spec),
            self._store_for(spec),
            self._indexer_for(spec),
            should_stop=control.cancelled.is_set,
            on_progress=progress,
        )

    def cancel(self, control: RunControl) -> None:
        """The pipeline stops after the batch in hand."""
        control.cancelled.set()
