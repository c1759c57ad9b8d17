"""One gRPC server bootstrap for every imagemesh service.

`create_server(settings, mounts)` builds a `grpc.aio` server that serves the given services
plus `grpc.health.v1` (a status per service, SERVING only once each service has warmed up)
and server reflection, with deliberate message-size, keepalive and connection-age limits and
the observability interceptor. Tests bind it to port 0 and talk to it over a real channel;
`serve_forever` adds signal handling for processes: on SIGTERM or SIGINT health turns
NOT_SERVING at once (so load balancers stop sending), calls in flight get the grace period
to finish, then the services release their resources.

A service served alone that has blocking handlers for its latency-bound methods (and
`server.blocking_front` on) is served through `imagemesh.front`: grpc's synchronous server
takes the public address, serves those methods itself and forwards the rest to the grpc.aio
server, which then listens on a Unix socket in a private temporary folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from imagemesh.auth import BlockingTokenAuthInterceptor, TokenAuthInterceptor
from imagemesh.channels import channel_options
from imagemesh.config import Settings
from imagemesh.front import BlockingFront, method_shapes
from imagemesh.interceptors import ObservabilityInterceptor, observed_blocking
from imagemesh.reflection_pool import MethodAwarePool

__all__ = ["MeshServer", "ServiceMount", "create_server", "serve_forever"]

_log = logging.getLogger(__name__)


@dataclass
class ServiceMount:
    """One service to serve: how to add it to a server, and its lifecycle hooks.

    `start` runs after the port is bound and before the service reports SERVING (load a
    model, open a backend); `stop` runs after the server stopped taking calls.
    `blocking_handlers`, if given, makes the handlers (by full method name) that the
    synchronous front serves itself when the service is served alone.
    """

    name: str
    register: Callable[[grpc.aio.Server], None]
    start: Callable[[], Awaitable[None]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    extra_names: Sequence[str] = field(default_factory=tuple)
    blocking_handlers: Callable[[], Mapping[str, grpc.RpcMethodHandler[Any, Any]]] | None = None


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
        self,
        settings: Settings,
        server: grpc.aio.Server,
        mounts: Sequence[ServiceMount],
        front: _Front | None = None,
    ) -> None:
        self.settings = settings
        self.server = server
        self.mounts = list(mounts)
        self.front = front
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
        if self.front is not None:  # health checks through it say NOT_SERVING until ready
            self.front.server.start()
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
        if self.front is not None:
            # First: the calls it forwards need the grpc.aio server until they end.
            await asyncio.to_thread(self.front.server.stop, grace)
        await self.server.stop(grace)
        if self.front is not None:
            self.front.folder.cleanup()
        for mount in reversed(self._started):
            if mount.stop is not None:
                try:
                    await mount.stop()
                except Exception:  # one service's cleanup must not skip the others'
                    _log.exception("stopping %s failed", mount.name)

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self.server.wait_for_termination()


@dataclass
class _Front:
    server: BlockingFront
    # Holds the grpc.aio server's Unix socket; removed once both servers stopped.
    folder: tempfile.TemporaryDirectory[str]


# A Unix socket's path holds at most 107 bytes (sun_path). The folder's name is the prefix
# and 8 random characters; the socket in it is "upstream.sock".
_SOCKET_PATH_MAX = 107
_SOCKET_IN_FOLDER = "/imagemesh-front-12345678/upstream.sock"


def _socket_folder() -> tempfile.TemporaryDirectory[str]:
    """A private folder (mode 0700) for the front's upstream socket: in the temporary folder
    ($TMPDIR), or in /tmp when $TMPDIR is too deep for a socket's path."""
    base = tempfile.gettempdir()
    if len(os.fsencode(base + _SOCKET_IN_FOLDER)) > _SOCKET_PATH_MAX:
        base = "/tmp"
    return tempfile.TemporaryDirectory(prefix="imagemesh-front-", dir=base)


def _blocking_front(
    settings: Settings, mounts: Sequence[ServiceMount], served_names: Sequence[str]
) -> _Front | None:
    """The synchronous front for `mounts`, if they call for one (see the module's doc)."""
    if not settings.server.blocking_front or len(mounts) != 1:
        return None
    make_handlers = mounts[0].blocking_handlers
    if make_handlers is None:
        return None
    access_log = settings.server.access_log
    native = {
        method: observed_blocking(method, handler, access_log=access_log)
        for method, handler in make_handlers().items()
    }
    pool = descriptor_pool.Default()
    shapes = method_shapes(pool.FindServiceByName(name) for name in served_names)
    folder = _socket_folder()
    interceptors: list[grpc.ServerInterceptor] = []  # type: ignore[type-arg]
    if settings.auth_token:
        interceptors.append(BlockingTokenAuthInterceptor(settings.auth_token))
    front = BlockingFront(
        native=native,
        shapes=shapes,
        upstream=f"unix:{folder.name}/upstream.sock",
        threads=settings.server.front_threads,
        options=_server_options(settings),
        interceptors=interceptors,
    )
    return _Front(front, folder)


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
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for mount in mounts:
        names.append(mount.name)
        names.extend(mount.extra_names)
    front = _blocking_front(settings, mounts, names)
    mesh = MeshServer(settings, server, mounts, front)
    health_pb2_grpc.add_HealthServicer_to_server(mesh.health, server)
    for mount in mounts:
        mount.register(server)
    # Reflection only calls the pool's lookups, which MethodAwarePool has (typed as a pool).
    pool = cast(descriptor_pool.DescriptorPool, MethodAwarePool())
    reflection.enable_server_reflection(names, server, pool=pool)
    chosen = settings.server.port if port is None else port
    address = f"{settings.server.host}:{chosen if chosen is not None else 0}"
    credentials = _server_credentials(settings)
    if front is not None:
        # The grpc.aio server is reached through the front only.
        server.add_insecure_port(f"unix:{front.folder.name}/upstream.sock")
        bound = front.server.bind(address, credentials)
    elif credentials is None:
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
