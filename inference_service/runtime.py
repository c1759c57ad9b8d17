"""TensorFlow specifics of serving: thread pools, and a compiled, shape-stable model call.

Measured on this machine (TF 2.21 CPU, 2 cores, 32x32 DenseNet121): an eager call takes ~20x
longer than a `tf.function`; a function traced with a `None` batch dimension traces once, and
each new batch shape still pays ~30-60 ms on its first call (kernel set-up), hence the padded
batch sizes warmed up before serving.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["compile_model", "configure_threads", "default_threads"]

_log = logging.getLogger(__name__)


def default_threads() -> tuple[int, int]:
    """(intra, inter) op threads when configured as 0: every core this process may use, and 1.

    Measured here with batches of 16-256: intra 2 / inter 1 beat TF's default 2 / 2 (one
    batch at a time leaves nothing for a second inter-op pool but contention).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores), 1


def configure_threads(intra_op: int, inter_op: int) -> tuple[int, int]:
    """Sizes TensorFlow's thread pools (0 means `default_threads`); returns what applies.

    TensorFlow fixes its pools when its runtime first starts; if that already happened in this
    process (a test that built a model first, or a second mesh), the existing pools stay and a
    warning says so.
    """
    import tensorflow as tf

    default_intra, default_inter = default_threads()
    intra = intra_op or default_intra
    inter = inter_op or default_inter
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        current = (
            tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads(),
        )
        if current != (intra, inter):
            _log.warning(
                "TensorFlow already started with intra/inter op threads %s; wanted (%d, %d)",
                current,
                intra,
                inter,
            )
        return current
    return intra, inter


def compile_model(keras_model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function: float32 (n, h, w, 3) pixels -> (n, k) probabilities, never run eagerly.

    Traced once for any batch size (`None` batch dimension in the input signature).
    """
    import tensorflow as tf

    _, height, width, channels = keras_model.input_shape
    spec = tf.TensorSpec([None, height, width, channels], tf.float32)

    @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
    def infer(pixels: Any) -> Any:
        return keras_model(pixels, training=False)

    def run(batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = infer(batch).numpy()
        return result

    return run
