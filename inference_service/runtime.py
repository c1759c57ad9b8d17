"""TensorFlow specifics of serving: thread pools, and a compiled, shape-stable model call.

Measured on this machine (TF 2.21 CPU, 2 cores, 32x32 DenseNet121): an eager call takes ~20x
longer than a `tf.function`; a function traced with a `None` batch dimension traces once, and
each new batch shape still pays ~30-60 ms on its first call (kernel set-up), hence the padded
batch sizes warmed up before serving.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from imagemesh.cores import usable_cores

__all__ = [
    "compile_model",
    "configure_onednn",
    "configure_threads",
    "default_threads",
    "model_instances",
]

_log = logging.getLogger(__name__)

# TensorFlow reads it once, when it is imported.
_ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"


def model_instances(configured: int) -> int:
    """The model instances to run: `configured`, or one per core when it is 0 (see
    `InferenceSettings.model_instances`)."""
    return configured or usable_cores()


def default_threads(instances: int = 1) -> tuple[int, int]:
    """(intra, inter) op threads when configured as 0, for `instances` concurrent batches.

    Each instance gets an equal share of the cores for its ops (intra), and the inter-op pool
    lets the instances' batches run at the same time. Measured on two cores (32x32
    DenseNet121): one batch at a time ran best at intra 2 / inter 1; two at a time at intra 1 /
    inter 2, which computed ~1.7x the images per second (splitting such small ops between
    two threads costs more in synchronisation than it gains).
    """
    instances = max(1, instances)
    return max(1, usable_cores() // instances), instances


def configure_threads(intra_op: int, inter_op: int, instances: int = 1) -> tuple[int, int]:
    """Sizes TensorFlow's thread pools (0 means `default_threads`); returns what applies.

    TensorFlow fixes its pools when its runtime first starts; if that already happened in this
    process (a test that built a model first, or a second mesh), the existing pools stay and a
    warning says so.
    """
    import tensorflow as tf

    default_intra, default_inter = default_threads(instances)
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


def configure_onednn(enabled: bool) -> bool | None:
    """Turns TensorFlow's oneDNN kernels on or off for this process; returns what applies
    (None if TensorFlow already started and cannot say).

    Off by default (`InferenceSettings.onednn`). Measured on this machine (TF 2.21 CPU, two
    cores, the 32x32 DenseNet121, the same model in two processes measured in alternating
    turns): without oneDNN a batch of one took 7.7-8.3 ms instead of 8.9-12.2, two batches of
    16 at once computed 1,099-1,102 images/s instead of 1,031-1,073, and one batch of 32 on
    both cores 771 instead of 687. On inputs this small, oneDNN's per-operation set-up costs
    more than its kernels save; larger inputs may gain from it (measure with
    `bench/inference.py` and `IMAGEMESH_INFERENCE__ONEDNN=true`).

    TensorFlow reads the switch when it is imported: if that already happened in this process
    (a test that built a model first, the trainer in the same process), its choice stays and a
    warning says so.
    """
    if "tensorflow" not in sys.modules:
        os.environ[_ONEDNN_VARIABLE] = "1" if enabled else "0"
        return enabled
    active = _onednn_active()
    if active is not None and active != enabled:
        _log.warning(
            "TensorFlow already started with oneDNN %s; wanted it %s",
            "on" if active else "off",
            "on" if enabled else "off",
        )
    return active


def _onednn_active() -> bool | None:
    try:
        from tensorflow.python.util import _pywrap_util_port
    except ImportError:  # a TensorFlow build without this module cannot tell
        return None
    return bool(_pywrap_util_port.IsMklEnabled())


def compile_model(keras_model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A function: float32 (n, h, w, 3) pixels -> (n, k) probabilities, never run eagerly.

    Traced once for any batch size (`None` batch dimension in the input signature), and
    called as that one concrete function: a `tf.function` call first looks its trace up in a
    cache keyed by a hash of its whole signature, captured variables included (DenseNet121
    has ~600), which cost ~1.2-1.5 ms of Python per call here, with the GIL held (measured:
    batch 1 in 11.3-11.8 ms through the `tf.function`, 9.8-10.2 ms through its concrete
    function).
    """
    import tensorflow as tf

    _, height, width, channels = keras_model.input_shape
    spec = tf.TensorSpec([None, height, width, channels], tf.float32)

    @tf.function(input_signature=[spec])  # type: ignore[untyped-decorator]
    def infer(pixels: Any) -> Any:
        return keras_model(pixels, training=False)

    return _ConcreteRun(infer)


class _ConcreteRun:
    """Calls a `tf.function`'s one concrete function; holds both (the first owns the second)."""

    def __init__(self, function: Any) -> None:
        self._function = function
        self._concrete = function.get_concrete_function()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        result: np.ndarray = self._concrete(batch).numpy()
        return result
