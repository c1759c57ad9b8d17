"""`make demo` step for the StorageService: a small generated dataset through the bulk stream.

Fifty random 32x32 PNGs in five labels go up on one `BulkUploadImages` stream (one
acknowledgement each, with a progress bar), one of them twice and one broken file among
them, to show the duplicate and rejected outcomes; then the dataset is listed a page at a
time and one image is downloaded back and compared byte for byte.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from collections.abc import Iterator

import grpc
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress
from rich.table import Table

from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

__all__ = ["step_storage"]

console = Console()

_LABELS = ["cat", "dog", "bird", "car", "tree"]
_DATASET = "demo-upload"


def _png(rng: random.Random) -> bytes:
    pixels = bytes(rng.getrandbits(8) for _ in range(32 * 32 * 3))
    out = io.BytesIO()
    Image.frombytes("RGB", (32, 32), pixels).save(out, "PNG")
    return out.getvalue()


def step_storage(address: str) -> None:
    """Uploads 50 images in 5 labels through the bulk stream and lists them."""
    rng = random.Random(4)
    images = [(f"{_LABELS[i % 5]}_{i:02d}.png", _LABELS[i % 5], _png(rng)) for i in range(50)]
    extra = [("cat_00_again.png", "cat", images[0][2]), ("broken.png", "cat", b"not a png")]

    def requests() -> Iterator[storage_pb2.BulkUploadImagesRequest]:
        for filename, label, data in images + extra:
            yield storage_pb2.BulkUploadImagesRequest(
                request_id=filename,
                header=storage_pb2.UploadImageHeader(
                    filename=filename, dataset=_DATASET, label=label, tags=["demo"]
                ),
                content=data,
            )

    outcomes: Counter[str] = Counter()
    with grpc.insecure_channel(address) as channel:
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("bulk upload", total=len(images) + len(extra))
            for ack in stub.BulkUploadImages(requests()):
                outcome = storage_pb2.UploadOutcome.Name(ack.outcome).removeprefix(
                    "UPLOAD_OUTCOME_"
                )
                outcomes[outcome.lower()] += 1
                if ack.outcome == storage_pb2.UPLOAD_OUTCOME_REJECTED:
                    console.print(
                        f"  {ack.request_id}: rejected ({ack.error.reason}): {ack.error.message}"
                    )
                progress.advance(task)
        console.print(
            f"  {outcomes['stored']} stored, {outcomes['duplicate']} duplicate, "
            f"{outcomes['rejected']} rejected"
        )

        listed: list[storage_pb2.Image] = []
        token = ""
        pages = 0
        while True:
            page = stub.ListImages(
                storage_pb2.ListImagesRequest(dataset=_DATASET, page_size=20, page_token=token)
            )
            listed += page.images
            pages += 1
            token = page.next_page_token
            if not token:
                break
        table = Table("label", "images", "first image", title=f"dataset {_DATASET}")
        by_label = Counter(image.label for image in listed)
        for label in _LABELS:
            first = next(i for i in listed if i.label == label)
            table.add_row(label, str(by_label[label]), f"{first.name[:19]}… {first.filename}")
        console.print(table)
        console.print(f"  listed {len(listed)} images in {pages} pages of 20")

        name = listed[0].name
        content = b"".join(
            r.chunk for r in stub.DownloadImage(storage_pb2.DownloadImageRequest(name=name))
        )
        same = hashlib.sha256(content).hexdigest() == name.removeprefix("images/")
        console.print(f"  downloaded {name[:19]}…: {len(content)} bytes, SHA-256 matches: {same}")
        if len(listed) != len(images) or not same:
            raise SystemExit("the storage demo did not get back what it uploaded")
