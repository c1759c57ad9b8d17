"""The model as a batch job uses it: a published version, called in fixed-size batches.

`BatchPredictor.predict` pads every batch to `batch_size` rows and calls the model through one
`tf.function` with a `None` batch dimension: the model is traced once per process, never per
task or per batch shape (each new shape would retrace for ~2 s; eager calls are 20x slower).
`cached_predictor` keeps one predictor per (model version, store, batch size) per process:
in a Spark Python worker that means per worker, across tasks and jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imagemesh.config import StorageSettings
from imagemesh.spark.worker import (
    configure_tensorflow,
    freeze_worker_heap,
    task_cores,
    worker_cached,
)

__all__ = ["BatchPredictor", "cached_predictor", "open_store_cached", "top_classes"]


@dataclass
class BatchPredictor:
    """A loaded model version: pixels (n, h, w, 3) in [0, 255] -> probabilities (n, classes)."""

    model_version: str
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    batch_size: int
    _call: Callable[[Any], Any]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities for every row of `pixels`, computed `batch_size` rows at a time."""
        count = pixels.shape[0]
        out = np.empty((count, len(self.class_names)), dtype=np.float32)
        for start in range(0, count, self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            real = chunk.shape[0]
            if real < self.batch_size:
                # Padding keeps one shape for every call (no retrace, same kernels).
                padded = np.zeros((self.batch_size, *chunk.shape[1:]), dtype=np.float32)
                padded[:real] = chunk
                chunk = padded
            result = self._call(np.ascontiguousarray(chunk, dtype=np.float32))
            out[start : start + real] = np.asarray(result)[:real]
        return out


def open_store_cached(settings: StorageSettings) -> Any:
    """The object store `settings` describe, opened once per process."""
    from storage_service.backends import open_object_store

    return worker_cached(
        ("object-store", settings.model_dump_json()), lambda: open_object_store(settings)
    )


def _load(model_version: str, storage: StorageSettings, batch_size: int) -> BatchPredictor:
    # TensorFlow is imported here, in the worker, after Spark forked it: never at import time.
    configure_tensorflow(task_cores(), 1)
    from inference_service.model.registry import ModelRegistry
    from inference_service.runtime import compile_model

    metadata, model = ModelRegistry(open_store_cached(storage)).load(model_version)
    height, width = metadata.input_height, metadata.input_width
    call = compile_model(model)
    # Traced and warmed here, once, at the only shape it will see.
    call(np.zeros((batch_size, height, width, 3), dtype=np.float32))
    freeze_worker_heap()
    return BatchPredictor(
        model_version=model_version,
        class_names=tuple(metadata.class_names),
        input_size=(height, width),
        batch_size=batch_size,
        _call=call,
    )


def cached_predictor(
    model_version: str, storage: StorageSettings, batch_size: int
) -> BatchPredictor:
    """This process's predictor for the version, loaded from the store on first use."""
    key = ("batch-predictor", model_version, storage.model_dump_json(), batch_size)
    return worker_cached(key, lambda: _load(model_version, storage, batch_size))


def top_classes(
    probabilities: np.ndarray, class_names: Sequence[str], k: int
) -> list[tuple[int, str, float]]:
    """The `k` most probable (index, name, probability), most probable first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [(int(i), class_names[int(i)], float(probabilities[int(i)])) for i in order]
