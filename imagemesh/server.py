"""One gRPC server bootstrap for every imagemesh service.

`create_server(settings, mounts)` builds a `grpc.aio` server that serves the given services
plus `grpc.health.v1` (a status per service, SERVING only once each service has warmed up)
and server reflection, with deliberate message-size, keepalive and connection-age limits and
the observability interceptor. Tests bind it to port 0 and talk to it over a real channel;
`serve_forever` adds signal handling for processes: on SIGTERM or SIGINT health turns
NOT_SERVING at once (so load balancers stop sending), calls in flight get the grace period
to finish, then the services release their resources.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from imagemesh.auth import TokenAuthInterceptor
from imagemesh.channels import channel_options
from imagemesh.config import Settings
from imagemesh.interceptors import ObservabilityInterceptor

__all__ = ["MeshServer", "ServiceMount", "create_server", "serve_forever"]

_log = logging.getLogger(__name__)


@dataclass
class ServiceMount:
    """One service to serve: how to add it to a server, and its lifecycle hooks.

    `start` runs after the port is bound and before the service reports SERVING (load a
    model, open a backend); `stop` runs after the server stopped taking calls.
    """

    name: str
    register: Callable[[grpc.aio.Server], None]
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    extra_names: Sequence[str] = field(default_factory=tuple)


def _server_options(settings: Settings) -> list[tuple[str, Any]]:
    s = settings.server
    # Message limits and keepalive are the same on both ends (shared with every client).
    return [
        *channel_options(settings),
        # Clients may ping as often as every 10 s without data in flight; more is abuse.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(s.max_connection_age_grace_s * 1000)),
    ]


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    s = settings.server
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    client_ca = Path(s.tls_client_ca_file).read_bytes() if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(s.tls_key_file).read_bytes(), Path(s.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class MeshServer:
    """A started-or-startable gRPC server with its health servicer and mounted services."""

    def __init__(
        self, settings: Settings, server: grpc.aio.Server, mounts: Sequence[ServiceMount]
    ) -> None:
        self.settings = settings
        self.server = server
        self.mounts = list(mounts)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._started: list[ServiceMount] = []
        self._stopped = asyncio.Event()

    @property
    def service_names(self) -> list[str]:
        """The full names of the mounted services (not health or reflection)."""
        return [m.name for m in self.mounts]

    async def start(self) -> None:
        """Binds, starts each service, and reports SERVING for each once it is ready."""
        for name in self.service_names:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        try:
            for mount in self.mounts:
                if mount.start is not None:
                    await mount.start()
                self._started.append(mount)
                await self.health.set(mount.name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            await self.stop(grace=0)
            raise
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Turns health NOT_SERVING, lets calls finish within `grace`, then stops services."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.settings.server.grace_period_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        for mount in reversed(self._started):
            if mount.stop is not None:
                try:
                    await mount.stop()
                except Exception:  # one service's cleanup must not skip the others'
                    _log.exception("stopping %s failed", mount.name)

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self.server.wait_for_termination()


def create_server(
    settings: Settings, mounts: Sequence[ServiceMount], *, port: int | None = None
) -> tuple[MeshServer, int]:
    """Builds (does not start) a server for `mounts`; returns it and the bound port.

    `port` overrides the configured one; 0 picks a free port (what tests use).
    """
    interceptors: list[grpc.aio.ServerInterceptor] = [  # type: ignore[type-arg]
        ObservabilityInterceptor(access_log=settings.server.access_log)
    ]
    if settings.auth_token:
        interceptors.append(TokenAuthInterceptor(settings.auth_token))
    server = grpc.aio.server(interceptors=interceptors, options=_server_options(settings))
    mesh = MeshServer(settings, server, mounts)
    health_pb2_grpc.add_HealthServicer_to_server(mesh.health, server)
    for mount in mounts:
        mount.register(server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for mount in mounts:
        names.append(mount.name)
        names.extend(mount.extra_names)
    reflection.enable_server_reflection(names, server)
    chosen = settings.server.port if port is None else port
    address = f"{settings.server.host}:{chosen if chosen is not None else 0}"
    credentials = _server_credentials(settings)
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot listen on {settings.server.host}:{chosen}")
    return mesh, bound


async def serve_forever(mesh: MeshServer, port: int) -> None:
    """Starts the server and runs it until SIGTERM or SIGINT, then shuts down gracefully."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    if mesh.settings.server.metrics_port:
        start_http_server(mesh.settings.server.metrics_port, addr=mesh.settings.server.host)
        _log.info(
            "metrics on http://%s:%d/metrics",
            mesh.settings.server.host,
            mesh.settings.server.metrics_port,
        )
    await mesh.start()
    _log.info("serving %s on %s:%d", ", ".join(mesh.service_names), mesh.settings.server.host, port)
    await stop_requested.wait()
    _log.info("shutting down (grace %.1f s)", mesh.settings.server.grace_period_s)
    await mesh.stop()
