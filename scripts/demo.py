"""`make demo`: start the one-process mesh on embedded defaults, run the end-to-end flow,
print what happened, and stop everything it started.

Each step is a function taking the mesh's address; later features add steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from demo_batch import step_batch
from demo_inference import step_classify
from demo_search import step_search
from demo_storage import step_storage
from demo_train import step_train
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rich.console import Console

from imagemesh.ports import free_loopback_port

console = Console()


def _wait_serving(address: str, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the mesh exited early with code {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise SystemExit(f"the mesh did not report SERVING within {timeout_s:.0f} s")


def step_services(address: str) -> None:
    """Lists the services through server reflection, as grpcurl would."""
    with grpc.insecure_channel(address) as chan:
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = sorted(s.name for r in replies for s in r.list_services_response.service)
    for name in names:
        console.print(f"  reflection lists [bold]{name}[/bold]")


def step_health(address: str) -> None:
    """Prints each service's health."""
    subprocess.run([sys.executable, "-m", "imagemesh", "health", address], check=True)


STEPS: list[tuple[str, Callable[[str], None]]] = [
    ("services the mesh exposes", step_services),
    ("health of each service", step_health),
    ("upload a generated dataset through the bulk stream (StorageService)", step_storage),
    ("train a classifier on a generated dataset (trainer)", step_train),
    ("classify a few images (InferenceService)", step_classify),
    ("search with per-class counts (SearchService)", step_search),
    ("classify the dataset as a Spark batch job, then search its predictions", step_batch),
]


def main() -> int:
    port = free_loopback_port()
    address = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="imagemesh-demo-") as data:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = data
        # Steps that run the CLI (e.g. publishing a model) must reach the mesh's data too.
        os.environ["XDG_DATA_HOME"] = data
        env.setdefault("IMAGEMESH_SERVER__LOG_LEVEL", "WARNING")
        log_path = Path(data) / "mesh.log"
        console.rule("imagemesh demo (embedded defaults: local folder, SQLite, Spark local[*])")
        console.print(f"starting [bold]imagemesh serve[/bold] on {address}, data in {data}")
        with log_path.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "imagemesh", "serve", "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                started = time.monotonic()
                _wait_serving(address, proc)
                console.print(f"mesh SERVING after {time.monotonic() - started:.1f} s")
                for number, (title, step) in enumerate(STEPS, start=1):
                    console.rule(f"{number}. {title}")
                    step(address)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        console.rule("done")
        console.print(f"mesh stopped (exit code {proc.returncode}); everything it started is gone")
        if proc.returncode != 0:
            console.print(log_path.read_text())
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
