"""How many model instances and TensorFlow threads the service sizes itself to."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


_ONEDNN_PROBE = """
import sys
from inference_service.runtime import configure_onednn
print(configure_onednn(sys.argv[1] == "on"))
from tensorflow.python.util import _pywrap_util_port
print(_pywrap_util_port.IsMklEnabled())
"""


@pytest.mark.parametrize("wanted", ["on", "off"])
def test_the_onednn_switch_applies_when_set_before_tensorflow_starts(wanted: str) -> None:
    # A fresh process: this one started TensorFlow long ago.
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run(
        [sys.executable, "-c", _ONEDNN_PROBE, wanted],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    expected = str(wanted == "on")
    assert done.stdout.split() == [expected, expected]


def test_the_onednn_switch_says_what_applies_once_tensorflow_started(
    tiny_models: TinyModels, caplog: pytest.LogCaptureFixture
) -> None:
    from tensorflow.python.util import _pywrap_util_port

    active = bool(_pywrap_util_port.IsMklEnabled())  # TensorFlow runs (tiny_models built)
    with caplog.at_level("WARNING", logger=runtime.__name__):
        assert runtime.configure_onednn(not active) is active
    assert "TensorFlow already started with oneDNN" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=runtime.__name__):
        assert runtime.configure_onednn(active) is active
    assert caplog.text == ""
