"""How the SearchService is mounted on a server."""

from __future__ import annotations

from imagemesh.mesh import MeshContext
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.server import ServiceMount
from imagemesh.unimplemented import unimplemented_servicer

__all__ = ["SERVICE_NAME", "mount"]

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name


def mount(ctx: MeshContext) -> ServiceMount:
    """The SearchService for this process (its RPCs are not implemented yet)."""
    servicer = unimplemented_servicer(search_pb2_grpc.SearchServiceServicer, "SearchService")
    return ServiceMount(
        name=SERVICE_NAME,
        register=lambda server: search_pb2_grpc.add_SearchServiceServicer_to_server(
            servicer, server
        ),
    )
