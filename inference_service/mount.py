"""How the InferenceService is mounted on a server."""

from __future__ import annotations

from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import MeshContext
from imagemesh.server import ServiceMount
from imagemesh.unimplemented import unimplemented_servicer

__all__ = ["SERVICE_NAME", "mount"]

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def mount(ctx: MeshContext) -> ServiceMount:
    """The InferenceService for this process (its RPCs are not implemented yet)."""
    servicer = unimplemented_servicer(
        inference_pb2_grpc.InferenceServiceServicer, "InferenceService"
    )
    return ServiceMount(
        name=SERVICE_NAME,
        register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            servicer, server
        ),
    )
