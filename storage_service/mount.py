"""How the StorageService is mounted on a server.

`start` opens the object store (S3 is contacted lazily, so a store that is down does not
keep the service from starting; calls then answer UNAVAILABLE), opens the search outbox and
starts draining it towards `ctx.address_of("search")`. `stop` stops the drainer; updates
not yet sent stay in the outbox for the next start.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from imagemesh.mesh import MeshContext
from imagemesh.server import ServiceMount
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from storage_service.backends import open_object_store
from storage_service.memory import return_large_buffers_to_os
from storage_service.outbox import Outbox, OutboxDrainer
from storage_service.search_client import SearchNotifier
from storage_service.service import StorageDomain
from storage_service.servicer import StorageServicer

__all__ = ["SERVICE_NAME", "StorageRuntime", "mount"]

SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name


@dataclass
class StorageRuntime:
    """The live parts of a started storage service (tests and tools inspect them)."""

    domain: StorageDomain
    outbox: Outbox
    drainer: OutboxDrainer
    notifier: SearchNotifier


def mount(ctx: MeshContext) -> ServiceMount:
    """The StorageService for this process."""
    servicer = StorageServicer(bulk_concurrency=ctx.settings.storage.bulk_concurrency)
    runtime: list[StorageRuntime] = []

    def register(server: grpc.aio.Server) -> None:
        storage_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)

    async def start() -> None:
        return_large_buffers_to_os()
        settings = ctx.settings.storage
        state_dir = settings.resolved_state_dir()
        store = open_object_store(settings)
        outbox = Outbox(state_dir / "search-outbox.sqlite3")
        notifier = SearchNotifier(ctx.address_of("search"), ctx.settings)
        drainer = OutboxDrainer(outbox, notifier.send)
        domain = StorageDomain(
            settings, store, outbox, state_dir=state_dir, on_outbox_change=drainer.notify
        )
        servicer.domain = domain
        drainer.start()
        runtime.append(StorageRuntime(domain, outbox, drainer, notifier))

    async def stop() -> None:
        for parts in runtime:
            await parts.drainer.stop()
            await parts.notifier.close()
            servicer.domain = None
            parts.domain.close()
            parts.outbox.close()
        runtime.clear()

    service_mount = ServiceMount(name=SERVICE_NAME, register=register, start=start, stop=stop)
    # Exposed for tests and tools that need to look inside (e.g. the outbox's backlog).
    service_mount.runtime = runtime  # type: ignore[attr-defined]
    return service_mount
