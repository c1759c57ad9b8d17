"""The `imagemesh` command line.

Commands:
    imagemesh serve [all|storage|search|inference]   run services (all three by default)
    imagemesh health [ADDRESS]                       print each service's health

Exit codes: 0 success, 1 a command failed (e.g. a service is not serving), 2 bad usage
or invalid configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from imagemesh.config import ConfigError, Settings, load_settings
from imagemesh.mesh import DEFAULT_PORTS, SERVICES, build_mesh
from imagemesh.server import serve_forever

__all__ = ["main"]

_SERVICE_NAMES = {
    "storage": "imagemesh.storage.v1.StorageService",
    "search": "imagemesh.search.v1.SearchService",
    "inference": "imagemesh.inference.v1.InferenceService",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagemesh", description="Store, search and classify images over gRPC."
    )
    parser.add_argument("--config", help="a TOML configuration file (else $IMAGEMESH_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the services")
    serve.add_argument("service", nargs="?", default="all", choices=["all", *SERVICES])
    serve.add_argument("--port", type=int, help="listening port (0 picks a free one)")
    serve.add_argument("--host", help="listening address (default 127.0.0.1)")

    health = commands.add_parser("health", help="print each service's health")
    health.add_argument(
        "address", nargs="?", default=f"127.0.0.1:{DEFAULT_PORTS['all']}", help="host:port"
    )
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    return parser


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    services = list(SERVICES) if args.service == "all" else [args.service]
    if args.host:
        settings.server.host = args.host

    async def run() -> None:
        # grpc.aio servers belong to the event loop they are created in.
        mesh, port = build_mesh(settings, services, port=args.port)
        print(
            f"imagemesh serving {', '.join(services)} on {settings.server.host}:{port}", flush=True
        )
        await serve_forever(mesh, port)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"imagemesh: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _health(args: argparse.Namespace) -> int:
    console = Console()
    table = Table(title=f"health of {args.address}")
    table.add_column("service")
    table.add_column("status")
    worst = 0
    with grpc.insecure_channel(args.address) as channel:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.command == "health":
        return _health(args)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        return 2
    _configure_logging(settings)
    if args.command == "serve":
        return _serve(args, settings)
    return 2  # argparse enforces a known command


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
