"""Every bench runs in its `--quick` mode and ends with its JSON line: the figures its issue asks
for are there and are numbers (closing notes and `make bench` rely on them; no other test runs
the benches as scripts). Timing figures are not compared with their goals here (the machine is
shared and noisy); correctness figures are."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import pytest

from tests.fixtures.engines import REPO_ROOT, S3Engine, SparkCluster

pytestmark = pytest.mark.slow


def _run_quick(name: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Runs `python -m bench.{name} --quick`; returns its last stdout line, checked."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert done.returncode == 0, f"bench.{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    lines = done.stdout.strip().splitlines()
    assert lines, f"bench.{name} printed nothing on stdout"
    figures = json.loads(lines[-1])
    assert figures["bench"] == name
    assert figures["quick"] is True
    for key in keys:
        value = figures.get(key)
        assert isinstance(value, int | float), f"{key} is {value!r}"
        assert not isinstance(value, bool)
        assert math.isfinite(value), f"{key} is {value}"
    return figures


def test_storage_bench(minio_engine: S3Engine) -> None:
    _run_quick(
        "storage",
        (
            "ratio_upload_large",
            "ratio_download_large",
            "ratio_bulk_small",
            "rss_mib_above_idle_1gib_upload",
        ),
    )


def test_search_bench(es_engine: str) -> None:
    figures = _run_quick(
        "search", ("ratio_bulk_index", "p50_overhead_ms", "paging_duplicates", "paging_missing")
    )
    # Paging through results while documents are added must neither repeat nor skip one.
    assert figures["paging_duplicates"] == 0
    assert figures["paging_missing"] == 0


def test_inference_bench() -> None:
    figures = _run_quick(
        "inference",
        (
            "p50_overhead_ms",
            "p99_overhead_ms",
            "ratio_concurrent_unary",
            "ratio_concurrent_stream",
            "rss_growth_pct",
            "p50_overhead_python_client_ms",
            "p99_overhead_python_client_ms",
        ),
    )
    assert figures["rss_calls"] == [1_000, 4_000]


def test_inference_paired_bench() -> None:
    figures = _run_quick("inference_paired", ())
    assert figures["variants"]
    for variant in figures["variants"].values():
        assert math.isfinite(variant["p50_ms"])


def test_batch_bench(minio_engine: S3Engine, spark_engine: SparkCluster) -> None:
    figures = _run_quick("batch", ("ratio_compute", "ratio_end_to_end", "images_per_s"))
    assert figures["images"] == 2_000


def test_train_bench() -> None:
    _run_quick("train", ("ratio_feature_extraction", "ratio_vs_keras_fit", "speedup_second_run"))
