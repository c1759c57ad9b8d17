"""The cores a process may use: affinity capped by a cgroup quota (used to size thread pools,
model instances and Spark workers' TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagemesh import cores
from imagemesh.spark import task_cores


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("max 100000\n", None),  # no quota
        ("200000 100000\n", 2),
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up, a half core still runs a thread
        ("50000 100000\n", 1),
        ("garbage\n", None),
        ("100000 0\n", None),
    ],
)
def test_a_cgroup_quota_is_read_from_cpu_max(tmp_path: Path, content: str, expected) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text(content)
    assert cores.cgroup_cpu_limit(cpu_max) == expected


def test_no_cgroup_file_means_no_quota(tmp_path: Path) -> None:
    assert cores.cgroup_cpu_limit(tmp_path / "missing") is None


def test_a_quota_caps_the_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: 2)
    assert cores.usable_cores() == 2
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: None)
    assert cores.usable_cores() == 64


def test_outside_a_spark_task_tasks_get_the_usable_cores_not_the_hosts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(cores.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(cores, "cgroup_cpu_limit", lambda: 3)
    assert task_cores() == 3
