"""`imagemesh health [ADDRESS]`: print each service's health."""

from __future__ import annotations

import argparse
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.mesh import DEFAULT_PORTS

__all__ = ["register"]


_SERVICE_NAMES = {
    "storage": "imagemesh.storage.v1.StorageService",
    "search": "imagemesh.search.v1.SearchService",
    "inference": "imagemesh.inference.v1.InferenceService",
}


def register(commands: Any) -> dict[str, Any]:
    """Adds `health` to the command line."""
    health = commands.add_parser("health", help="print each service's health")
    health.add_argument(
        "address", nargs="?", default=f"127.0.0.1:{DEFAULT_PORTS['all']}", help="host:port"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    return {"health": run}


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Prints a table of health statuses; 1 if anything is not SERVING."""
    console = Console()
    table = Table(title=f"health of {args.address}")
    table.add_column("service")
    table.add_column("status")
    worst = 0
    assert settings is not None
    # The deployment's TLS settings apply: a TLS-only server refuses a plaintext probe.
    with open_sync_channel(args.address, settings) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for label, name in [("(server)", ""), *_SERVICE_NAMES.items()]:
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=name), timeout=args.timeout
                )
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    status = "NOT_HERE"
                    if label == "(server)":
                        worst = 1
                else:
                    status = f"{code.name}: {exc.details()}"
                    worst = 1
            else:
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    worst = 1
            table.add_row(label, status)
    console.print(table)
    return worst
