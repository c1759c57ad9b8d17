"""Which services one process serves, and how each reaches the others.

`imagemesh serve` mounts all three services on one port (the embedded mesh, default port
50050); `imagemesh serve storage|search|inference` mounts one (default 50051/50052/50053),
reaching the others at the configured `*_address`. In the one-process mesh a service
reaches another through the process's own port, over the same gRPC contract as when they
are apart, so both deployments run the same code paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from imagemesh.config import Settings
from imagemesh.server import MeshServer, ServiceMount, create_server

__all__ = ["DEFAULT_PORTS", "SERVICES", "MeshContext", "build_mesh"]

SERVICES = ("storage", "search", "inference")
DEFAULT_PORTS = {"all": 50050, "storage": 50051, "search": 50052, "inference": 50053}


@dataclass
class MeshContext:
    """What a service needs to know about the rest of the mesh."""

    settings: Settings
    self_address: str

    def address_of(self, service: str) -> str:
        """The gRPC address where `service` is reached from this process."""
        configured = getattr(self.settings, f"{service}_address")
        return str(configured) if configured else self.self_address


def _mount(service: str, ctx: MeshContext) -> ServiceMount:
    # Imported lazily: serving search alone must not import TensorFlow.
    if service == "storage":
        from storage_service.mount import mount as mount_storage

        return mount_storage(ctx)
    if service == "search":
        from search_service.mount import mount as mount_search

        return mount_search(ctx)
    if service == "inference":
        from inference_service.mount import mount as mount_inference

        return mount_inference(ctx)
    raise ValueError(f"unknown service {service!r}; expected one of {', '.join(SERVICES)}")


def build_mesh(
    settings: Settings, services: Sequence[str] = SERVICES, *, port: int | None = None
) -> tuple[MeshServer, int]:
    """A server for `services`, bound to `port` (else the configured or default port)."""
    if port is None:
        port = settings.server.port
    if port is None:
        port = DEFAULT_PORTS["all" if len(services) > 1 else services[0]]
    ctx = MeshContext(settings=settings, self_address="")
    # Services need the bound port to reach each other through it, and the port is known only
    # once bound, so the context is completed right after binding and before any start hook.
    mounts: list[ServiceMount] = [_mount(s, ctx) for s in services]
    mesh, bound = create_server(settings, mounts, port=port)
    host = settings.server.host
    ctx.self_address = f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{bound}"
    return mesh, bound
