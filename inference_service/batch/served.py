"""LOCAL jobs through the service's own loaded model and micro-batcher.

A small job runs in the inference service's process; when the version it names is the one the
service has loaded, its images go through that version's `MicroBatcher`, like any Classify
call: no second copy of the model in memory, and online calls keep being served between the
job's images instead of waiting behind a private model call. A version the service has not
loaded gets this process's own cached predictor (`predictor.cached_predictor`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from imagemesh.errors import ResourceExhausted

from .pipeline import JobSpec, Predictor
from .predictor import cached_predictor

__all__ = ["ServedPredictors"]


class _BatcherPredictor:
    """`Predictor` that submits every row to the served version's micro-batcher."""

    def __init__(self, manager: Any, name: str, metadata: Any, loop: asyncio.AbstractEventLoop):
        self._manager = manager
        self._loop = loop
        self.model_version = name
        self.class_names = tuple(metadata.class_names)
        self.input_size = (metadata.input_height, metadata.input_width)

    async def _predict(self, pixels: np.ndarray) -> np.ndarray:
        served = await self._manager.acquire(self.model_version)
        try:
            results = await asyncio.gather(*(self._submit(served, row) for row in pixels))
        finally:
            self._manager.release(served)
        return np.stack([np.asarray(r.output, dtype=np.float32) for r in results])

    @staticmethod
    async def _submit(served: Any, row: np.ndarray) -> Any:
        while True:
            try:
                return await served.batcher.submit(row)
            except ResourceExhausted as exc:  # online traffic filled the queue: wait a turn
                await asyncio.sleep(exc.retry_after_s or 0.01)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for every row (called from a job thread, never the event loop)."""
        future = asyncio.run_coroutine_threadsafe(self._predict(pixels), self._loop)
        return future.result()


class ServedPredictors:
    """Chooses, per job, the service's loaded version or a private cached copy."""

    def __init__(self, manager: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._manager = manager
        self._loop = loop

    def __call__(self, spec: JobSpec) -> Predictor:
        """The predictor for `spec.model_version`."""
        served = self._manager.find_loaded(spec.model_version)
        if served is not None:
            return _BatcherPredictor(self._manager, spec.model_version, served.metadata, self._loop)
        return cached_predictor(spec.model_version, spec.storage, spec.batch_size)
