"""Helpers to run a search-only server on a chosen backend, reached over a real channel."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from elasticsearch import Elasticsearch

from imagemesh.config import Settings, load_settings
from imagemesh.mesh import build_mesh
from imagemesh.search.v1 import search_pb2, search_pb2_grpc


def search_settings(
    backend: str, tmp_path: Path, *, es_url: str = "", prefix: str = "", **search: Any
) -> Settings:
    """Settings for a search service on `backend` with its data in `tmp_path` or `prefix`."""
    section: dict[str, Any] = {"backend": backend, "sqlite_path": tmp_path / "search.sqlite3"}
    if backend == "elasticsearch":
        # Few retries: a test of a down cluster should fail fast, not back off for long.
        section["elasticsearch"] = {
            "url": es_url,
            "index_prefix": prefix,
            "max_retries": 1,
            "request_timeout_s": 10,
        }
    section.update(search)
    settings = load_settings(search=section)
    settings.server.access_log = False
    return settings


@contextlib.asynccontextmanager
async def running_server(settings: Settings) -> AsyncIterator[str]:
    """A started search-only server on port 0; yields its address."""
    server, port = build_mesh(settings, ["search"], port=0)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)


@contextlib.asynccontextmanager
async def running_search(settings: Settings) -> AsyncIterator[search_pb2_grpc.SearchServiceStub]:
    """A started search-only server on port 0 and a stub on a channel to it."""
    async with (
        running_server(settings) as address,
        grpc.aio.insecure_channel(address) as channel,
    ):
        yield search_pb2_grpc.SearchServiceStub(channel)


def drop_template(es_url: str, prefix: str) -> None:
    """Removes the index template a test's service created (the indices go with es_index)."""
    client = Elasticsearch(es_url)
    try:
        client.options(ignore_status=404).indices.delete_index_template(name=f"{prefix}-images")
    finally:
        client.close()


WAIT = search_pb2.REFRESH_POLICY_WAIT_FOR
