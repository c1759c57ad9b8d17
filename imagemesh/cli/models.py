"""`imagemesh models list|select|publish-random`: see, choose and bootstrap model versions.

`list` and `select` talk to a running InferenceService; `publish-random` writes a new version
straight to the configured object store (as the trainer does), so that a fresh deployment has
something to serve before a real model is trained.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import DEFAULT_PORTS

__all__ = ["inference_address", "register"]


def inference_address(settings: Settings, given: str | None) -> str:
    """The address to reach the InferenceService: `--address`, the configured one, or the
    one-process mesh's default port on this machine."""
    return given or settings.inference_address or f"127.0.0.1:{DEFAULT_PORTS['all']}"


def register(commands: Any) -> dict[str, Any]:
    """Adds `models` to the command line."""
    models = commands.add_parser("models", help="list, select or publish model versions")
    actions = models.add_subparsers(dest="models_action", required=True)

    listing = actions.add_parser("list", help="list published versions, newest first")
    listing.add_argument("--model", default="", help="only this model, e.g. models/default")
    listing.add_argument("--address", help="the inference service, host:port")

    select = actions.add_parser("select", help="serve a version from now on")
    select.add_argument("name", help="models/{model}/versions/{version}")
    select.add_argument("--address", help="the inference service, host:port")

    publish = actions.add_parser(
        "publish-random",
        help="publish an UNTRAINED DenseNet121 classifier (random weights) to start with",
    )
    publish.add_argument("model", nargs="?", default=None, help="model id (default: configured)")
    publish.add_argument(
        "--classes",
        default="circle,square,triangle,cross,ring",
        help="comma-separated class names (default: the generated dataset's five)",
    )
    publish.add_argument("--input-size", type=int, default=32, help="input height and width")
    publish.add_argument("--seed", type=int, default=None, help="seed of the random weights")
    publish.add_argument("--version", default=None, help="version id (default: time-based)")
    publish.add_argument(
        "--select", action="store_true", help="then make the running service serve it"
    )
    publish.add_argument("--address", help="the inference service for --select, host:port")
    return {"models": run}


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Runs one `models` action."""
    assert settings is not None
    console = Console()
    try:
        if args.models_action == "list":
            return _list(console, settings, args)
        if args.models_action == "select":
            return _select(console, settings, inference_address(settings, args.address), args.name)
        return _publish_random(console, settings, args)
    except grpc.RpcError as exc:
        print(f"imagemesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1


def _list(console: Console, settings: Settings, args: argparse.Namespace) -> int:
    address = inference_address(settings, args.address)
    table = Table(title=f"model versions at {address}")
    for column in ("version", "serving", "classes", "input", "backbone", "metrics", "created"):
        table.add_column(column)
    with open_sync_channel(address, settings) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        token = ""
        while True:
            page = stub.ListModelVersions(
                inference_pb2.ListModelVersionsRequest(model=args.model, page_token=token),
                timeout=30,
            )
            for v in page.model_versions:
                table.add_row(
                    v.name,
                    "yes" if v.serving else "",
                    ", ".join(v.class_names),
                    f"{v.input_height}x{v.input_width}",
                    v.backbone_weights,
                    ", ".join(f"{k}={val:.3f}" for k, val in sorted(v.metrics.items())),
                    v.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
                )
            token = page.next_page_token
            if not token:
                break
    console.print(table)
    return 0


def _select(console: Console, settings: Settings, address: str, name: str) -> int:
    with (
        console.status(f"loading and warming up {name}"),
        open_sync_channel(address, settings) as channel,
    ):
        reply = inference_pb2_grpc.InferenceServiceStub(channel).SelectModelVersion(
            inference_pb2.SelectModelVersionRequest(name=name), timeout=600
        )
    was = reply.previous_model_version or "nothing"
    console.print(f"now serving [bold]{reply.model_version.name}[/bold] (was {was})")
    return 0


def _publish_random(console: Console, settings: Settings, args: argparse.Namespace) -> int:
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    model = args.model or settings.inference.model
    # TensorFlow's C++ start-up chatter (CUDA probing on a CPU machine) is noise here.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with console.status("building an untrained DenseNet121 classifier (TensorFlow)"):
        from inference_service.model.densenet import build_untrained_classifier
        from inference_service.model.registry import ModelRegistry
        from storage_service.backends import open_object_store

        keras_model = build_untrained_classifier(
            len(classes), (args.input_size, args.input_size), seed=args.seed
        )
    with console.status(f"publishing to the {settings.storage.backend} object store"):
        metadata = ModelRegistry(open_object_store(settings.storage)).publish(
            model,
            keras_model,
            class_names=classes,
            backbone_weights="none",
            version=args.version,
            description="untrained: random backbone and head, published to bootstrap serving",
        )
    console.print(
        f"published [bold]{metadata.name}[/bold]: UNTRAINED (random weights), its answers mean "
        "nothing; train a real model with the trainer"
    )
    if args.select:
        return _select(console, settings, inference_address(settings, args.address), metadata.name)
    return 0
