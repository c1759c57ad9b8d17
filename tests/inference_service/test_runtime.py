"""How many model instances and TensorFlow threads the service sizes itself to."""

from __future__ import annotations

import numpy as np
import pytest

from inference_service import runtime
from tests.inference_service.fixtures import TinyModels


def test_the_instances_default_to_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "usable_cores", lambda: 2)
    assert runtime.model_instances(0) == 2
    assert runtime.model_instances(3) == 3  # configured: kept as it is


def test_threads_are_shared_among_the_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    # One instance: all cores for its ops, one batch at a time.
    assert runtime.default_threads(1) == (8, 1)
    # Instances run their batches at once (inter) on their share of the cores (intra).
    assert runtime.default_threads(2) == (4, 2)
    assert runtime.default_threads(8) == (1, 8)
    assert runtime.default_threads(16) == (1, 16)


def test_the_compiled_model_agrees_with_keras_at_every_batch_size_and_traces_once(
    tiny_models: TinyModels,
) -> None:
    keras_model = tiny_models.first
    run = runtime.compile_model(keras_model)
    pixels = np.random.default_rng(3).uniform(0, 255, size=(8, 32, 32, 3)).astype(np.float32)
    for size in (1, 3, 8):
        expected = keras_model(pixels[:size], training=False).numpy()
        np.testing.assert_allclose(run(pixels[:size]), expected, atol=1e-5)
    # One trace serves every batch size (a retrace costs seconds at the first call).
    assert run._function.experimental_get_tracing_count() == 1
