"""`imagemesh classify FILE...`: classify local image files with the running service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.cli.models import inference_address
from imagemesh.config import Settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["register"]


def register(commands: Any) -> dict[str, Any]:
    """Adds `classify` to the command line."""
    classify = commands.add_parser("classify", help="classify image files (or .npy arrays)")
    classify.add_argument("files", nargs="+", type=Path, help="PNG, JPEG, WebP, BMP, TIFF, .npy")
    classify.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    classify.add_argument("--model-version", default="", help="models/{model}/versions/{v}")
    classify.add_argument("--address", help="the inference service, host:port")
    return {"classify": run}


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Streams the files through ClassifyStream; prints their top classes. 1 if any failed."""
    assert settings is not None
    console = Console()
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        print(f"imagemesh: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2

    def requests() -> Iterator[inference_pb2.ClassifyStreamRequest]:
        for index, path in enumerate(args.files):
            yield inference_pb2.ClassifyStreamRequest(
                request_id=str(index),
                request=inference_pb2.ClassifyRequest(
                    content=path.read_bytes(),
                    top_k=args.top_k,
                    model_version=args.model_version,
                ),
            )

    answers: dict[int, inference_pb2.ClassifyStreamResponse] = {}
    address = inference_address(settings, args.address)
    try:
        with open_sync_channel(address, settings) as channel, Progress(console=console) as progress:
            task = progress.add_task("classifying", total=len(args.files))
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for answer in stub.ClassifyStream(requests()):
                answers[int(answer.request_id)] = answer
                progress.advance(task)
    except grpc.RpcError as exc:
        print(f"imagemesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    table = Table(title=f"classified by {address}")
    table.add_column("file")
    table.add_column("top classes")
    table.add_column("model version")
    failed = 0
    for index, path in enumerate(args.files):
        answer = answers[index]
        if answer.HasField("error"):
            failed += 1
            table.add_row(str(path), f"[red]{answer.error.code}: {answer.error.message}[/red]", "")
            continue
        tops = ", ".join(f"{c.class_name} {c.probability:.1%}" for c in answer.response.top_classes)
        table.add_row(str(path), tops, answer.response.model_version)
    console.print(table)
    return 1 if failed else 0
