"""Turning a job's selection into image names, over the other services' gRPC APIs.

- explicit names: validated and de-duplicated (an image named twice is classified once);
- a dataset: every image StorageService's ListImages returns for it, page by page;
- a search filter: every image SearchService's SearchImages matches, page by page.

Resolution happens when the job starts running, not when it is created: a dataset of a
million images must not hold up the BatchClassify call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

import grpc
from google.protobuf import json_format

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.errors import FailedPrecondition, InvalidArgument, Unavailable
from imagemesh.names import image_sha256
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

from .jobs import Selection

__all__ = [
    "MAX_EXPLICIT_NAMES",
    "MAX_RESOLVED_NAMES",
    "GrpcSelectionResolver",
    "SelectionResolver",
    "unique_names",
]

MAX_EXPLICIT_NAMES = 100_000
# A dataset or filter selecting more than this is refused: the names are held in memory by the
# driver and spread over partitions from there.
MAX_RESOLVED_NAMES = 5_000_000
_PAGE = 1000


def unique_names(names: Iterable[str], *, field: str = "selection.images.names") -> list[str]:
    """The names in order, each once; `InvalidArgument` naming the first malformed one."""
    seen: set[str] = set()
    result: list[str] = []
    for index, name in enumerate(names):
        image_sha256(name, field=f"{field}[{index}]")
        if name not in seen:
            seen.add(name)
            result.append(name)
    return result


class SelectionResolver(Protocol):
    """Resolves a selection to image names; `should_stop` lets a cancel interrupt paging."""

    def resolve(self, selection: Selection, should_stop: Callable[[], bool]) -> list[str]:
        """The selected names, each once."""
        ...


class GrpcSelectionResolver:
    """`SelectionResolver` through StorageService (datasets) and SearchService (filters)."""

    def __init__(
        self,
        storage_address: str,
        search_address: str,
        settings: Settings | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self._storage_address = storage_address
        self._search_address = search_address
        self._settings = settings or Settings()
        self._timeout_s = timeout_s

    def resolve(self, selection: Selection, should_stop: Callable[[], bool]) -> list[str]:
        """See `SelectionResolver.resolve`."""
        if selection.dataset is not None:
            return self._dataset(selection.dataset, should_stop)
        if selection.filter is not None:
            return self._filter(selection.filter, should_stop)
        return unique_names(selection.names)

    def _dataset(self, dataset: str, should_stop: Callable[[], bool]) -> list[str]:
        names: list[str] = []
        with open_sync_channel(self._storage_address, self._settings) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            token = ""
            while not should_stop():
                try:
                    page = stub.ListImages(
                        storage_pb2.ListImagesRequest(
                            dataset=dataset, page_size=_PAGE, page_token=token
                        ),
                        timeout=self._timeout_s,
                    )
                except grpc.RpcError as exc:
                    raise _rpc_error(
                        "StorageService.ListImages", self._storage_address, exc
                    ) from None
                names.extend(image.name for image in page.images)
                _check_size(len(names))
                token = page.next_page_token
                if not token:
                    break
        return unique_names(names)

    def _filter(self, document: dict[str, object], should_stop: Callable[[], bool]) -> list[str]:
        image_filter = json_format.ParseDict(document, search_pb2.ImageFilter())
        names: list[str] = []
        with open_sync_channel(self._search_address, self._settings) as channel:
            stub = search_pb2_grpc.SearchServiceStub(channel)
            token = ""
            while not should_stop():
                try:
                    page = stub.SearchImages(
                        search_pb2.SearchImagesRequest(
                            filter=image_filter, page_size=_PAGE, page_token=token
                        ),
                        timeout=self._timeout_s,
                    )
                except grpc.RpcError as exc:
                    raise _rpc_error(
                        "SearchService.SearchImages", self._search_address, exc
                    ) from None
                names.extend(document.name for document in page.documents)
                _check_size(len(names))
                token = page.next_page_token
                if not token:
                    break
        return unique_names(names)


def _check_size(count: int) -> None:
    if count > MAX_RESOLVED_NAMES:
        raise FailedPrecondition(
            f"the selection holds more than {MAX_RESOLVED_NAMES:,} images; split it (e.g. by "
            "search filter on create_time) into several jobs",
            reason="SELECTION_TOO_LARGE",
        )


def _rpc_error(what: str, address: str, exc: grpc.RpcError) -> Exception:
    code = exc.code()
    details = exc.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(f"{what} refused the selection: {details}", field="selection")
    return Unavailable(f"{what} at {address} failed: {code.name}: {details}")
