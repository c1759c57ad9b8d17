"""`imagemesh train`: clean -> extract (cached) -> train -> evaluate -> publish, with progress.

The dataset is read from StorageService (ListImages: membership and labels) and the image bytes
from the object store the settings name (`storage`), where Spark workers read them too. The
new version is published to the same store, where InferenceService lists it; `--select` also
asks the service to serve it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.cli.dataset import storage_address
from imagemesh.cli.models import inference_address
from imagemesh.config import Settings
from imagemesh.errors import ImageMeshError, InvalidArgument
from trainer.head import HeadConfig
from trainer.networks import PixelTrainConfig
from trainer.pipeline import TrainOptions, run_training
from trainer.source import list_dataset

__all__ = ["RichStages", "register"]


def register(commands: Any) -> dict[str, Any]:
    """Adds `train` to the command line."""
    train = commands.add_parser("train", help="train and publish a classifier on a dataset")
    train.add_argument("--dataset", default="shapes", help="the dataset in storage")
    train.add_argument("--model", help="publish as models/MODEL (default: trainer.model)")
    train.add_argument(
        "--architecture",
        choices=["densenet121", "basic-cnn"],
        default="densenet121",
        help="densenet121: head on cached backbone features (default); basic-cnn: the "
        "seed's baseline CNN trained on pixels",
    )
    train.add_argument("--fine-tune", action="store_true", help="then train the whole network")
    train.add_argument("--weights", help="backbone weights: imagenet or a file (default random)")
    train.add_argument("--epochs", type=int, help="head epochs (default 30)")
    train.add_argument("--pixel-epochs", type=int, help="CNN / fine-tune epochs (default 20)")
    train.add_argument("--seed", type=int, default=0, help="seed of split, init and shuffles")
    train.add_argument("--val-fraction", type=float, default=0.2, help="default 0.2")
    spark = train.add_mutually_exclusive_group()
    spark.add_argument("--spark", dest="spark", action="store_true", default=None)
    spark.add_argument("--no-spark", dest="spark", action="store_false", help="all in process")
    train.add_argument("--select", action="store_true", help="serve the new version at once")
    train.add_argument("--report", type=Path, help="also write the run's summary JSON here")
    train.add_argument("--address", help="the mesh (storage and inference), host:port")
    return {"train": run}


class RichStages:
    """The pipeline's progress as rich progress bars, one per stage."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def start(self, stage: str, total: int | None) -> None:
        """Adds the stage's bar (a spinner when the total is unknown)."""
        self._tasks[stage] = self._progress.add_task(stage, total=total, note="")

    def advance(self, stage: str, amount: int = 1, note: str = "") -> None:
        """Moves the stage's bar."""
        self._progress.update(self._tasks[stage], advance=amount, note=note)

    def finish(self, stage: str, summary: str) -> None:
        """Completes the bar and shows the stage's summary."""
        task = self._tasks[stage]
        total = self._progress.tasks[task].total
        self._progress.update(task, total=total or 1, completed=total or 1, note=summary)


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Trains and publishes; 1 if a service or the pipeline failed, 2 for bad input."""
    assert settings is not None
    console = Console()
    trainer = settings.trainer
    use_spark = trainer.use_spark if args.spark is None else args.spark
    defaults = TrainOptions()
    options = TrainOptions(
        model=args.model or trainer.model,
        architecture=args.architecture,
        fine_tune=args.fine_tune,
        weights=args.weights,
        seed=args.seed,
        val_fraction=args.val_fraction,
        head=HeadConfig(epochs=args.epochs or defaults.head.epochs, seed=args.seed),
        pixels=PixelTrainConfig(epochs=args.pixel_epochs or defaults.pixels.epochs, seed=args.seed),
    )
    if args.fine_tune and args.architecture != "densenet121":
        print("imagemesh: --fine-tune applies to densenet121 only", file=sys.stderr)
        return 2
    from storage_service.backends import open_object_store

    address = storage_address(settings, args.address)
    try:
        with open_sync_channel(address, settings) as channel:
            records = list_dataset(channel, args.dataset)
    except grpc.RpcError as exc:
        print(f"imagemesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    if not records:
        print(
            f"imagemesh: dataset {args.dataset!r} is empty; add images with "
            "`imagemesh dataset generate` or `imagemesh dataset import FOLDER`",
            file=sys.stderr,
        )
        return 2
    console.print(
        f"training [bold]{options.architecture}[/bold]"
        f"{' (fine-tuned)' if options.fine_tune else ''} on dataset {args.dataset} "
        f"({len(records)} images), "
        + (f"on Spark {settings.spark.master}" if use_spark else "in process")
    )
    app = None
    if use_spark:
        from imagemesh.spark.app import SparkApp

        app = SparkApp(settings.spark)
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )
    try:
        with Progress(*columns, console=console) as progress:
            report = run_training(
                records,
                store=open_object_store(settings.storage),
                storage=settings.storage,
                options=options,
                spark_context=app.context if app is not None else None,
                progress=RichStages(progress),
            )
    except ImageMeshError as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidArgument) else 1
    finally:
        if app is not None:
            app.stop()
    _print_summary(console, report.to_dict())
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=2))
    if args.select:
        return _select(settings, args.address, report.model_version, console)
    return 0


def _print_summary(console: Console, summary: dict[str, Any]) -> None:
    table = Table(title=f"published {summary['model_version']}")
    table.add_column("class")
    table.add_column("precision", justify="right")
    table.add_column("recall", justify="right")
    table.add_column("F1", justify="right")
    table.add_column("support", justify="right")
    for name, scores in summary["evaluation"]["per_class"].items():
        table.add_row(
            name,
            f"{scores['precision']:.3f}",
            f"{scores['recall']:.3f}",
            f"{scores['f1']:.3f}",
            str(scores["support"]),
        )
    console.print(table)
    console.print(
        f"validation accuracy [bold]{summary['evaluation']['accuracy']:.2%}[/bold] "
        f"({summary['architecture']}); features: {summary['features_extracted']} extracted, "
        f"{summary['features_cached']} from the cache; reports in {summary['report_prefix']}"
    )


def _select(settings: Settings, given: str | None, version: str, console: Console) -> int:
    from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc

    try:
        with open_sync_channel(inference_address(settings, given), settings) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            stub.SelectModelVersion(
                inference_pb2.SelectModelVersionRequest(name=version), timeout=600
            )
    except grpc.RpcError as exc:
        print(
            f"imagemesh: selecting {version}: {exc.code().name}: {exc.details()}", file=sys.stderr
        )
        return 1
    console.print(f"InferenceService now serves {version}")
    return 0
