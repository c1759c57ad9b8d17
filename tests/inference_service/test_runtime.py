"""How many model instances and TensorFlow threads the service sizes itself to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_service import runtime
from tests.inference_service.fixtures import TinyModels


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("max 100000\n", None),  # no quota
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up, a half core still runs an instance
        ("50000 100000\n", 1),
        ("garbage\n", None),
        ("100000 0\n", None),
    ],
)
def test_a_cgroup_quota_is_read_from_cpu_max(tmp_path: Path, content: str, expected) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(content)
    assert runtime.cgroup_cpu_limit(cpu_max) == expected


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert runtime.cgroup_cpu_limit(tmp_path / "missing") is None


def test_a_quota_caps_the_cores_and_so_the_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: 2)
    assert runtime.usable_cores() == 2
    assert runtime.model_instances(0) == 2
    assert runtime.model_instances(3) == 3  # configured: kept as it is
    monkeypatch.setattr(runtime, "cgroup_cpu_limit", lambda: None)
    assert runtime.usable_cores() == 64


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
