"""The `imagemesh` command: configuration errors, serve, health, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imagemesh.cli import main
from imagemesh.ports import free_loopback_port


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEMESH_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env.update(extra)
    return env


def test_bad_environment_value_exits_2_naming_the_variable(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "imagemesh", "serve"],
        env=_env(tmp_path, IMAGEMESH_STORAGE__BACKEND="ftp"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "IMAGEMESH_STORAGE__BACKEND" in result.stderr
    assert "'local' or 's3'" in result.stderr


def test_bad_toml_file_exits_2(tmp_path: Path, capsys: object) -> None:
    config = tmp_path / "imagemesh.toml"
    config.write_text("[server]\nport = 'not a number'\n")
    assert main(["--config", str(config), "serve"]) == 2
    missing = tmp_path / "missing.toml"
    assert main(["--config", str(missing), "serve"]) == 2


def test_unknown_toml_key_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "imagemesh.toml"
    config.write_text("[server]\nprot = 50050\n")
    assert main(["--config", str(config), "serve"]) == 2


def test_serve_reports_serving_then_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_loopback_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagemesh", "serve", "--port", str(port)],
        env=_env(tmp_path, IMAGEMESH_SERVER__GRACE_PERIOD_S="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        status = None
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            stub = health_pb2_grpc.HealthStub(chan)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING
        health = subprocess.run(
            [sys.executable, "-m", "imagemesh", "health", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert health.returncode == 0, health.stdout
        assert health.stdout.count("SERVING") == 4
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_of_nothing_listening_exits_1(tmp_path: Path) -> None:
    assert main(["health", f"127.0.0.1:{free_loopback_port()}", "--timeout", "0.5"]) == 1
