"""Datasets through StorageService: listing a dataset's labelled images, uploading images.

The trainer reads a dataset's membership and labels from StorageService (`ListImages`, page by
page) and the bytes straight from the object store (`images/{sha256}`), where Spark workers can
read them in parallel. Uploads go through the bulk stream (`BulkUploadImages`), one message
per image, with one acknowledgement each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

from .datasets import generate_images, to_png
from .images import LabelledImage

__all__ = [
    "IMAGE_SUFFIXES",
    "UploadItem",
    "UploadResult",
    "folder_items",
    "generated_items",
    "list_dataset",
    "upload",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_PAGE = 1000


@dataclass(frozen=True)
class UploadItem:
    """One image to upload: a file name, its bytes and its label."""

    filename: str
    content: bytes
    label: str


@dataclass
class UploadResult:
    """Counts of what an upload did, and the first rejections (file name, message)."""

    stored: int = 0
    duplicate: int = 0
    rejected: int = 0
    rejections: list[tuple[str, str]] | None = None


def list_dataset(channel: Any, dataset: str, *, timeout_s: float = 60.0) -> list[LabelledImage]:
    """Every image of `dataset` with its label, through StorageService's ListImages."""
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    records: list[LabelledImage] = []
    token = ""
    while True:
        page = stub.ListImages(
            storage_pb2.ListImagesRequest(dataset=dataset, page_size=_PAGE, page_token=token),
            timeout=timeout_s,
        )
        records.extend(LabelledImage(image.sha256, image.label) for image in page.images)
        token = page.next_page_token
        if not token:
            return records


def generated_items(count: int, *, seed: int = 0, start: int = 0) -> Iterator[UploadItem]:
    """The generated dataset `seed`'s images `start`..`start + count - 1`, as PNG uploads."""
    for image in generate_images(count, seed=seed, start=start):
        yield UploadItem(
            f"{image.label}/{seed}-{image.index:07d}.png", to_png(image.pixels), image.label
        )


def folder_items(folder: Path) -> list[tuple[Path, str]]:
    """(file, label) of a folder-per-class dataset: `folder/{label}/{file}`, sorted.

    Raises ValueError when the folder has no class sub-folder with an image in it.
    """
    found = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                found.append((path, class_dir.name))
    if not found:
        raise ValueError(
            f"{folder} holds no images in class folders: expected {folder}/<label>/<image>"
            f" with suffixes {', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    return found


def upload(
    channel: Any,
    items: Iterable[UploadItem],
    dataset: str,
    *,
    on_ack: Callable[[int], None] | None = None,
    timeout_s: float | None = None,
) -> UploadResult:
    """Uploads `items` on one BulkUploadImages stream; `on_ack(1)` per acknowledgement."""
    stub = storage_pb2_grpc.StorageServiceStub(channel)
    names: dict[str, str] = {}

    def requests() -> Iterator[storage_pb2.BulkUploadImagesRequest]:
        for index, item in enumerate(items):
            names[str(index)] = item.filename
            yield storage_pb2.BulkUploadImagesRequest(
                request_id=str(index),
                header=storage_pb2.UploadImageHeader(
                    filename=item.filename, dataset=dataset, label=item.label
                ),
                content=item.content,
            )

    result = UploadResult(rejections=[])
    for ack in stub.BulkUploadImages(requests(), timeout=timeout_s):
        if ack.outcome == storage_pb2.UPLOAD_OUTCOME_STORED:
            result.stored += 1
        elif ack.outcome == storage_pb2.UPLOAD_OUTCOME_DUPLICATE:
            result.duplicate += 1
        else:
            result.rejected += 1
            if result.rejections is not None and len(result.rejections) < 20:
                result.rejections.append(
                    (names.get(ack.request_id, ack.request_id), ack.error.message)
                )
        if on_ack is not None:
            on_ack(1)
    return result
