"""`imagemesh dataset generate|import`: put a labelled dataset into StorageService.

Both upload through the bulk stream (`BulkUploadImages`), one acknowledgement per image, with a
progress bar. `generate` makes the deterministic 5-class 32x32 shapes set (`trainer.datasets`);
`import FOLDER` takes a folder per class (`FOLDER/<label>/<image>`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.mesh import DEFAULT_PORTS
from trainer.source import UploadItem, UploadResult, folder_items, generated_items, upload

__all__ = ["register", "storage_address"]


def storage_address(settings: Settings, given: str | None) -> str:
    """`--address`, the configured StorageService address, or the local mesh's default port."""
    return given or settings.storage_address or f"127.0.0.1:{DEFAULT_PORTS['all']}"


def register(commands: Any) -> dict[str, Any]:
    """Adds `dataset` to the command line."""
    dataset = commands.add_parser("dataset", help="generate or import a labelled image dataset")
    actions = dataset.add_subparsers(dest="dataset_action", required=True)
    generate = actions.add_parser("generate", help="upload the generated 5-class shapes set")
    generate.add_argument("--count", type=int, default=1000, help="images (default 1000)")
    generate.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    generate.add_argument("--start", type=int, default=0, help="index of the first image")
    imports = actions.add_parser("import", help="upload a folder with one sub-folder per class")
    imports.add_argument("folder", type=Path, help="FOLDER/<label>/<image files>")
    for action in (generate, imports):
        action.add_argument("--dataset", default="shapes", help="dataset name (default shapes)")
        action.add_argument("--address", help="the storage service, host:port")
    return {"dataset": run}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Uploads the dataset; 1 if the service failed or any image was rejected."""
    assert settings is not None
    console = Console()
    if args.dataset_action == "generate":
        if args.count < 1:
            print("imagemesh: --count must be at least 1", file=sys.stderr)
            return 2
        total = args.count
        items: Iterator[UploadItem] = generated_items(args.count, seed=args.seed, start=args.start)
    else:
        if not args.folder.is_dir():
            print(f"imagemesh: {args.folder} is not a folder", file=sys.stderr)
            return 2
        try:
            files = folder_items(args.folder)
        except ValueError as exc:
            print(f"imagemesh: {exc}", file=sys.stderr)
            return 2
        total = len(files)
        items = (
            UploadItem(str(path.relative_to(args.folder)), path.read_bytes(), label)
            for path, label in files
        )
    address = storage_address(settings, args.address)
    try:
        with open_sync_channel(address, settings) as channel, _progress(console) as bar:
            task = bar.add_task(f"uploading to dataset {args.dataset}", total=total)
            result: UploadResult = upload(
                channel, items, args.dataset, on_ack=lambda n: bar.advance(task, n)
            )
    except grpc.RpcError as exc:
        print(f"imagemesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    console.print(
        f"dataset [bold]{args.dataset}[/bold]: {result.stored} stored, "
        f"{result.duplicate} already there, {result.rejected} rejected"
    )
    for filename, message in result.rejections or []:
        console.print(f"  [red]rejected[/red] {filename}: {message}")
    return 1 if result.rejected else 0
