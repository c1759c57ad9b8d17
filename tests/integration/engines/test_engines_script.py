"""deploy/local/engines.sh keeps its contract: idempotent `up`, truthful `status`."""

from __future__ import annotations

import os
import subprocess
import time

from tests.fixtures.engines import ENGINES_SH, S3Engine, engine_state_dir


def _engines_sh(command: str, engines: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENGINES_SH), command],
        env={**os.environ, "ENGINES": engines},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_up_leaves_a_healthy_engine_alone(minio_engine: S3Engine) -> None:
    pidfile = engine_state_dir("minio") / "run" / "minio.pid"
    before = pidfile.read_text() if pidfile.exists() else None

    started = time.monotonic()
    result = _engines_sh("up", "minio")

    assert result.returncode == 0, result.stderr
    assert "minio: already healthy, left alone" in result.stderr
    assert time.monotonic() - started < 15
    after = pidfile.read_text() if pidfile.exists() else None
    assert after == before  # no second server was started over the first


def test_status_reports_health_per_engine_and_exits_zero_when_healthy(
    minio_engine: S3Engine,
) -> None:
    result = _engines_sh("status", "minio")
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = result.stdout.splitlines()
    assert line.split()[:2] == ["minio", "healthy"]
    assert minio_engine.endpoint in line


def test_unknown_engine_is_refused() -> None:
    result = _engines_sh("status", "minio cassandra")
    assert result.returncode != 0
    assert "unknown engine 'cassandra'" in result.stderr
