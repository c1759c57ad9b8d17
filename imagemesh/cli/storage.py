"""Storage commands: `imagemesh upload`, `imagemesh images list|get|download|delete`,
`imagemesh reindex`.

`upload` sends files (or every image under folders) to a running StorageService: small
files through one bulk stream (the server stores many at once), larger ones through the
streaming upload with their SHA-256 announced, with a progress bar. `--labels-from-folders`
labels each image with its parent folder's name (a folder per class). `reindex` reads the
object store the configuration names and re-sends every image to the SearchService, then
compacts the dataset logs; it is how an index lost or rebuilt elsewhere catches up.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.mesh import DEFAULT_PORTS
from imagemesh.storage.v1 import storage_pb2, storage_pb2_grpc

__all__ = ["register"]

_DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORTS['all']}"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Files up to this size go through the bulk stream, whole in one message each.
_BULK_MAX_BYTES = 4 * 1024 * 1024
_CHUNK = 1024 * 1024
_OUTCOMES = {
    storage_pb2.UPLOAD_OUTCOME_STORED: "stored",
    storage_pb2.UPLOAD_OUTCOME_DUPLICATE: "duplicate",
    storage_pb2.UPLOAD_OUTCOME_REJECTED: "rejected",
}


def register(commands: Any) -> dict[str, Any]:
    """Adds `upload`, `images` and `reindex` to the command line."""
    up = commands.add_parser("upload", help="upload image files or folders")
    up.add_argument("paths", nargs="+", type=Path, help="files, or folders searched recursively")
    up.add_argument("--address", default=_DEFAULT_ADDRESS, help="StorageService host:port")
    up.add_argument("--dataset", default="", help="dataset name (default: default)")
    up.add_argument("--label", default="", help="ground-truth label for every file")
    up.add_argument(
        "--labels-from-folders", action="store_true", help="label = the parent folder's name"
    )
    up.add_argument("--tag", action="append", default=[], help="repeatable")
    up.add_argument("--json", action="store_true", help="print one JSON summary")

    images = commands.add_parser("images", help="list, show, download or delete stored images")
    sub = images.add_subparsers(dest="images_command", required=True)
    ls = sub.add_parser("list", help="list a dataset's images")
    ls.add_argument("--dataset", default="")
    ls.add_argument("--page-size", type=int, default=50)
    ls.add_argument("--page-token", default="")
    ls.add_argument("--all", action="store_true", help="follow the pages to the end")
    for p in (ls, *(sub.add_parser(n, help=f"{n} one image") for n in ("get", "delete"))):
        p.add_argument("--address", default=_DEFAULT_ADDRESS, help="StorageService host:port")
        p.add_argument("--json", action="store_true", help="print JSON")
        if p is not ls:
            p.add_argument("name", help="images/{sha256}")
    dl = sub.add_parser("download", help="download one image to a file")
    dl.add_argument("name", help="images/{sha256}")
    dl.add_argument("-o", "--output", type=Path, required=True)
    dl.add_argument("--address", default=_DEFAULT_ADDRESS, help="StorageService host:port")

    re = commands.add_parser("reindex", help="re-send every stored image to the search index")
    re.add_argument(
        "--search-address",
        default="",
        help="SearchService host:port (default: search_address, else the local mesh)",
    )
    re.add_argument("--batch-size", type=int, default=500)
    re.add_argument("--no-compact", action="store_true", help="leave the dataset logs as they are")
    re.add_argument(
        "--no-prune",
        action="store_true",
        help="keep index entries of images that are no longer stored",
    )
    return {"upload": run_upload, "images": run_images, "reindex": run_reindex}


# -- upload ------------------------------------------------------------------------------


def _files(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise SystemExit(f"imagemesh upload: {path} does not exist")
    return found


def _header(path: Path, args: argparse.Namespace, **extra: Any) -> storage_pb2.UploadImageHeader:
    label = path.parent.name if args.labels_from_folders else args.label
    return storage_pb2.UploadImageHeader(
        filename=path.name, dataset=args.dataset, label=label, tags=args.tag, **extra
    )


def _stream_upload(
    stub: storage_pb2_grpc.StorageServiceStub, path: Path, args: argparse.Namespace
) -> storage_pb2.UploadImageResponse:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
    size = path.stat().st_size

    def requests() -> Iterator[storage_pb2.UploadImageRequest]:
        yield storage_pb2.UploadImageRequest(
            header=_header(path, args, expected_sha256=digest.hexdigest(), expected_size_bytes=size)
        )
        with path.open("rb") as source:
            while chunk := source.read(_CHUNK):
                yield storage_pb2.UploadImageRequest(chunk=chunk)

    reply: storage_pb2.UploadImageResponse = stub.UploadImage(requests())
    return reply


def run_upload(args: argparse.Namespace, settings: Settings | None) -> int:
    """Uploads the files; exit code 1 if any was rejected."""
    assert settings is not None
    files = _files(args.paths)
    small = [p for p in files if p.stat().st_size <= _BULK_MAX_BYTES]
    large = [p for p in files if p.stat().st_size > _BULK_MAX_BYTES]
    counts = {"stored": 0, "duplicate": 0, "rejected": 0}
    rejected: list[tuple[str, str]] = []
    console = Console(stderr=True)
    with (
        open_sync_channel(args.address, settings) as channel,
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=args.json,
        ) as progress,
    ):
        stub = storage_pb2_grpc.StorageServiceStub(channel)
        task = progress.add_task("uploading", total=len(files))

        def bulk_requests() -> Iterator[storage_pb2.BulkUploadImagesRequest]:
            for index, path in enumerate(small):
                yield storage_pb2.BulkUploadImagesRequest(
                    request_id=str(index), header=_header(path, args), content=path.read_bytes()
                )

        try:
            if small:
                for ack in stub.BulkUploadImages(bulk_requests()):
                    outcome = _OUTCOMES.get(ack.outcome, "rejected")
                    counts[outcome] += 1
                    if outcome == "rejected":
                        rejected.append((str(small[int(ack.request_id)]), ack.error.message))
                    progress.advance(task)
            for path in large:
                try:
                    reply = _stream_upload(stub, path, args)
                    counts["duplicate" if reply.duplicate else "stored"] += 1
                except grpc.RpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED):
                        raise
                    counts["rejected"] += 1
                    rejected.append((str(path), exc.details() or exc.code().name))
                progress.advance(task)
        except grpc.RpcError as exc:
            print(f"imagemesh upload: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({**counts, "rejected_files": dict(rejected)}))
    else:
        for filename, reason in rejected:
            console.print(f"[red]rejected[/red] {filename}: {reason}")
        print(
            f"{counts['stored']} stored, {counts['duplicate']} duplicate, "
            f"{counts['rejected']} rejected"
        )
    return 1 if counts["rejected"] else 0


# -- images ------------------------------------------------------------------------------


def _row(image: storage_pb2.Image) -> list[str]:
    return [
        image.name,
        image.filename,
        image.dataset,
        image.label,
        f"{image.width}x{image.height}",
        str(image.size_bytes),
    ]


def run_images(args: argparse.Namespace, settings: Settings | None) -> int:
    """Runs `images list|get|download|delete`."""
    assert settings is not None
    try:
        with open_sync_channel(args.address, settings) as channel:
            stub = storage_pb2_grpc.StorageServiceStub(channel)
            return _images(stub, args)
    except grpc.RpcError as exc:
        print(f"imagemesh images: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _images(stub: storage_pb2_grpc.StorageServiceStub, args: argparse.Namespace) -> int:
    command = args.images_command
    if command == "list":
        images: list[storage_pb2.Image] = []
        token = args.page_token
        while True:
            page = stub.ListImages(
                storage_pb2.ListImagesRequest(
                    dataset=args.dataset, page_size=args.page_size, page_token=token
                )
            )
            images += page.images
            token = page.next_page_token
            if not (args.all and token):
                break
        if args.json:
            print(
                json.dumps(
                    {
                        "images": [MessageToDict(i) for i in images],
                        "next_page_token": token,
                    }
                )
            )
            return 0
        table = Table("name", "filename", "dataset", "label", "size", "bytes")
        for image in images:
            table.add_row(*_row(image))
        Console().print(table)
        print(f"{len(images)} images" + (f"; next page token: {token}" if token else ""))
        return 0
    if command == "get":
        image = stub.GetImage(storage_pb2.GetImageRequest(name=args.name)).image
        print(json.dumps(MessageToDict(image), indent=None if args.json else 2))
        return 0
    if command == "delete":
        reply = stub.DeleteImage(storage_pb2.DeleteImageRequest(name=args.name))
        print(f"deleted {args.name} and {reply.deleted_array_count} arrays derived from it")
        return 0
    written = 0
    temp = args.output.with_name(args.output.name + ".part")
    with temp.open("wb") as out:
        for part in stub.DownloadImage(storage_pb2.DownloadImageRequest(name=args.name)):
            out.write(part.chunk)
            written += len(part.chunk)
    temp.replace(args.output)
    print(f"wrote {written} bytes to {args.output}")
    return 0


# -- reindex -----------------------------------------------------------------------------


def run_reindex(args: argparse.Namespace, settings: Settings | None) -> int:
    """Re-sends every stored image to the search index."""
    assert settings is not None
    from storage_service.backends import open_object_store
    from storage_service.reindex import reindex
    from storage_service.search_client import SearchNotifier

    address = args.search_address or settings.search_address or _DEFAULT_ADDRESS
    store = open_object_store(settings.storage)
    console = Console(stderr=True)

    async def go() -> int:
        notifier = SearchNotifier(address, settings)
        try:
            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                "{task.completed} images",
                console=console,
            ) as progress:
                task = progress.add_task("reindexing", total=None)
                report = await reindex(
                    store,
                    notifier,
                    batch_size=args.batch_size,
                    compact_logs=not args.no_compact,
                    prune=not args.no_prune,
                    progress=lambda n: progress.advance(task, n),
                )
        except grpc.aio.AioRpcError as exc:
            print(
                f"imagemesh reindex: SearchService at {address}: {exc.code().name}: "
                f"{exc.details()}",
                file=sys.stderr,
            )
            return 1
        finally:
            await notifier.close()
        print(
            f"reindexed {report.indexed} of {report.images} images in {report.datasets} "
            f"datasets ({report.refused} refused by search); "
            f"{report.log_segments_removed} dataset-log segments compacted; "
            f"{report.stale_removed} index entries of images no longer stored removed"
        )
        return 0

    return asyncio.run(go())
