"""How the SearchService is mounted on a server: backend from settings, domain, servicer."""

from __future__ import annotations

from imagemesh.config import SearchBackend as BackendKind
from imagemesh.config import SearchSettings
from imagemesh.mesh import MeshContext
from imagemesh.page_tokens import PageTokenCodec
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.server import ServiceMount
from search_service.backend import SearchBackend
from search_service.service import SearchDomain
from search_service.servicer import SearchServicer

__all__ = ["SERVICE_NAME", "create_backend", "mount"]

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["SearchService"].full_name


def create_backend(settings: SearchSettings) -> SearchBackend:
    """The configured backend (imports only the one in use)."""
    if settings.backend is BackendKind.ELASTICSEARCH:
        from search_service.elasticsearch_backend import ElasticsearchBackend

        # A point in time outlives the token that names it, so the token expires first and
        # says so; a PIT lost earlier (e.g. a cluster restart) is reported as expired too.
        return ElasticsearchBackend(
            settings.elasticsearch, pit_keep_alive_s=settings.page_token_ttl_s + 60
        )
    from search_service.sqlite_backend import SqliteBackend

    return SqliteBackend(settings.sqlite_path)


def mount(ctx: MeshContext) -> ServiceMount:
    """The SearchService for this process, on the configured backend."""
    settings = ctx.settings.search
    backend = create_backend(settings)
    domain = SearchDomain(
        backend,
        PageTokenCodec(settings.page_token_secret),
        token_ttl_s=settings.page_token_ttl_s,
    )
    servicer = SearchServicer(domain)
    return ServiceMount(
        name=SERVICE_NAME,
        register=lambda server: search_pb2_grpc.add_SearchServiceServicer_to_server(
            servicer, server
        ),
        start=backend.start,
        stop=backend.close,
    )
