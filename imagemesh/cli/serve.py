"""`imagemesh serve [all|storage|search|inference]`: run services until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from imagemesh.config import Settings
from imagemesh.mesh import SERVICES, build_mesh
from imagemesh.server import serve_forever

__all__ = ["register"]


def register(commands: Any) -> dict[str, Any]:
    """Adds `serve` to the command line."""
    serve = commands.add_parser("serve", help="run the services")
    serve.add_argument("service", nargs="?", default="all", choices=["all", *SERVICES])
    serve.add_argument("--port", type=int, help="listening port (0 picks a free one)")
    serve.add_argument("--host", help="listening address (default 127.0.0.1)")
    return {"serve": run}


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Serves until a signal arrives."""
    assert settings is not None
    services = list(SERVICES) if args.service == "all" else [args.service]
    if args.host:
        settings.server.host = args.host

    async def serve() -> None:
        # grpc.aio servers belong to the event loop they are created in.
        mesh, port = build_mesh(settings, services, port=args.port)
        print(
            f"imagemesh serving {', '.join(services)} on {settings.server.host}:{port}", flush=True
        )
        await serve_forever(mesh, port)

    try:
        asyncio.run(serve())
    except OSError as exc:
        print(f"imagemesh: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0
