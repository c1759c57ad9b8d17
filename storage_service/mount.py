"""How the StorageService is mounted on a server."""

from __future__ import annotations

from imagemesh.mesh import MeshContext
from imagemesh.server import ServiceMount
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc
from imagemesh.unimplemented import unimplemented_servicer

__all__ = ["SERVICE_NAME", "mount"]

SERVICE_NAME = storage_pb2.DESCRIPTOR.services_by_name["StorageService"].full_name


def mount(ctx: MeshContext) -> ServiceMount:
    """The StorageService for this process (its RPCs are not implemented yet)."""
    servicer = unimplemented_servicer(storage_pb2_grpc.StorageServiceServicer, "StorageService")
    return ServiceMount(
        name=SERVICE_NAME,
        register=lambda server: storage_pb2_grpc.add_StorageServiceServicer_to_server(
            servicer, server
        ),
    )
