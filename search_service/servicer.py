"""The SearchService's gRPC servicer: proto in, domain call, proto out, errors mapped."""

from __future__ import annotations

import grpc

from imagemesh.errors import ImageMeshError
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.status import abort_with
from search_service.convert import (
    add_documents,
    document_from_proto,
    document_to_proto,
    failure_to_proto,
    prediction_from_proto,
    search_request_from_proto,
)
from search_service.service import SearchDomain

__all__ = ["SearchServicer"]

_Context = grpc.aio.ServicerContext[object, object]


def _wait(policy: int) -> bool:
    return policy == search_pb2.REFRESH_POLICY_WAIT_FOR


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    """Serves `imagemesh.search.v1.SearchService` over a `SearchDomain`."""

    def __init__(self, domain: SearchDomain) -> None:
        self._domain = domain

    async def IndexImages(
        self, request: search_pb2.IndexImagesRequest, context: _Context
    ) -> search_pb2.IndexImagesResponse:
        """Indexes documents; invalid ones are reported per item."""
        try:
            result = await self._domain.index_images(
                [document_from_proto(d) for d in request.documents], wait=_wait(request.refresh)
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return search_pb2.IndexImagesResponse(
            indexed_count=result.applied, errors=[failure_to_proto(f) for f in result.failures]
        )

    async def IndexPredictions(
        self, request: search_pb2.IndexPredictionsRequest, context: _Context
    ) -> search_pb2.IndexPredictionsResponse:
        """Records predictions; invalid ones and unknown images are reported per item."""
        try:
            result = await self._domain.index_predictions(
                [(p.image, prediction_from_proto(p.prediction)) for p in request.predictions],
                wait=_wait(request.refresh),
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return search_pb2.IndexPredictionsResponse(
            indexed_count=result.applied, errors=[failure_to_proto(f) for f in result.failures]
        )

    async def DeleteImages(
        self, request: search_pb2.DeleteImagesRequest, context: _Context
    ) -> search_pb2.DeleteImagesResponse:
        """Removes documents."""
        try:
            deleted = await self._domain.delete_images(
                list(request.names), wait=_wait(request.refresh)
            )
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return search_pb2.DeleteImagesResponse(deleted_count=deleted)

    async def GetImageDocument(
        self, request: search_pb2.GetImageDocumentRequest, context: _Context
    ) -> search_pb2.GetImageDocumentResponse:
        """Returns one document."""
        try:
            record = await self._domain.get_image(request.name)
        except ImageMeshError as exc:
            await abort_with(context, exc)
        return search_pb2.GetImageDocumentResponse(document=document_to_proto(record))

    async def SearchImages(
        self, request: search_pb2.SearchImagesRequest, context: _Context
    ) -> search_pb2.SearchImagesResponse:
        """Runs a search."""
        try:
            page, token = await self._domain.search(search_request_from_proto(request))
        except ImageMeshError as exc:
            await abort_with(context, exc)
        response = search_pb2.SearchImagesResponse(next_page_token=token, total_size=page.total)
        add_documents(response.documents, page.documents)
        for value, count in page.counts:
            response.counts.add(value=value, count=count)
        return response
