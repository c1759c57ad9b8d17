"""`imagemesh batch start|watch|cancel|list`: batch classification jobs, with live progress.

`start` creates a job over image names, a dataset or a search filter, then (unless
`--no-watch`) follows it with a progress bar until it ends; `watch` follows an existing job;
`cancel` asks one to stop; `list` prints a table. Exit codes: 0 the job succeeded (or the
action worked), 1 it failed or was cancelled or the call failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import grpc
from google.protobuf import json_format
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from imagemesh.channels import open_sync_channel
from imagemesh.config import Settings
from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.mesh import DEFAULT_PORTS
from imagemesh.search.v1 import search_pb2

__all__ = ["follow", "register"]

_MODES = {
    "auto": inference_pb2.BATCH_MODE_AUTO,
    "local": inference_pb2.BATCH_MODE_LOCAL,
    "spark": inference_pb2.BATCH_MODE_SPARK,
}


def _state(job: inference_pb2.BatchJob) -> str:
    return inference_pb2.BatchJobState.Name(job.state).removeprefix("BATCH_JOB_STATE_")


def _mode(job: inference_pb2.BatchJob) -> str:
    return inference_pb2.BatchMode.Name(job.mode).removeprefix("BATCH_MODE_")


def register(commands: Any) -> dict[str, Any]:
    """Adds `batch` to the command line."""
    batch = commands.add_parser("batch", help="run and follow batch classification jobs")
    actions = batch.add_subparsers(dest="batch_action", required=True)

    start = actions.add_parser("start", help="classify a selection of stored images as a job")
    chosen = start.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--images", nargs="+", metavar="NAME", help="images/{sha256} names")
    chosen.add_argument("--images-file", help="a file of image names, one per line")
    chosen.add_argument("--dataset", help="every image of this dataset")
    chosen.add_argument("--filter", help="every image matching this ImageFilter, as JSON")
    start.add_argument("--model-version", default="", help="default: the serving version")
    start.add_argument("--mode", choices=sorted(_MODES), default="auto")
    start.add_argument("--top-k", type=int, default=0, help="classes kept per prediction")
    start.add_argument("--store-inputs", action="store_true", help="store inputs as .npy too")
    start.add_argument("--request-id", default="", help="idempotency key")
    start.add_argument("--no-watch", action="store_true", help="return once the job exists")

    watch = actions.add_parser("watch", help="follow a job until it ends")
    watch.add_argument("name", help="batchJobs/{job_id}")

    cancel = actions.add_parser("cancel", help="ask a job to stop")
    cancel.add_argument("name", help="batchJobs/{job_id}")

    listing = actions.add_parser("list", help="list jobs, newest first")
    listing.add_argument(
        "--state",
        choices=[
            s.lower()
            for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED")
        ],
    )
    listing.add_argument("--limit", type=int, default=20)

    for parser in (start, watch, cancel, listing):
        parser.add_argument("--address", help="the inference service, host:port")
    return {"batch": run}


def run(args: argparse.Namespace, settings: Settings | None) -> int:
    """Runs one `batch` action."""
    assert settings is not None
    console = Console()
    address = args.address or settings.inference_address or f"127.0.0.1:{DEFAULT_PORTS['all']}"
    try:
        with open_sync_channel(address, settings) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            if args.batch_action == "start":
                return _start(console, stub, args)
            if args.batch_action == "watch":
                return follow(console, stub, args.name)
            if args.batch_action == "cancel":
                reply = stub.CancelBatchJob(inference_pb2.CancelBatchJobRequest(name=args.name))
                console.print(f"{reply.job.name}: {_state(reply.job)}")
                return 0
            return _list(console, stub, args)
    except grpc.RpcError as exc:
        print(f"imagemesh: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"imagemesh: {exc}", file=sys.stderr)
        return 2


def _selection(args: argparse.Namespace) -> inference_pb2.BatchSelection:
    if args.dataset:
        return inference_pb2.BatchSelection(dataset=args.dataset)
    if args.filter:
        image_filter = json_format.Parse(args.filter, search_pb2.ImageFilter())
        return inference_pb2.BatchSelection(filter=image_filter)
    names = args.images
    if not names:
        with open(args.images_file, encoding="utf-8") as lines:
            names = [line.strip() for line in lines if line.strip()]
    return inference_pb2.BatchSelection(images=inference_pb2.ImageNames(names=names))


def _start(console: Console, stub: Any, args: argparse.Namespace) -> int:
    reply = stub.BatchClassify(
        inference_pb2.BatchClassifyRequest(
            selection=_selection(args),
            model_version=args.model_version,
            mode=_MODES[args.mode],
            store_inputs=args.store_inputs,
            top_k=args.top_k,
            request_id=args.request_id,
        )
    )
    console.print(f"started [bold]{reply.job.name}[/bold] with {reply.job.model_version}")
    if args.no_watch:
        return 0
    return follow(console, stub, reply.job.name)


def follow(console: Console, stub: Any, name: str) -> int:
    """Shows a job's live progress until it ends; 0 if it succeeded, else 1."""
    job = None
    columns = (
        TextColumn("[bold]{task.fields[state]:<10}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TextColumn("{task.fields[rate]:>7.1f} img/s"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=None, state="PENDING", failed=0, rate=0.0, eta="-")
        for update in stub.WatchBatchJob(inference_pb2.WatchBatchJobRequest(name=name)):
            job = update.job
            eta = "-"
            if job.HasField("estimated_time_remaining"):
                eta = f"{job.estimated_time_remaining.ToTimedelta().total_seconds():.0f}s"
            progress.update(
                task,
                total=job.total_count or None,
                completed=job.processed_count + job.failed_count,
                state=_state(job),
                failed=job.failed_count,
                rate=job.images_per_second,
                eta=eta,
            )
    if job is None:
        return 1
    console.print(
        f"{job.name}: {_state(job)} on {_mode(job)}: {job.processed_count} classified, "
        f"{job.failed_count} failed of {job.total_count}"
    )
    for failure in job.failures[:10]:
        console.print(
            f"  [red]{failure.image}[/red]: {failure.error.reason}: {failure.error.message}"
        )
    if job.error_message:
        console.print(f"  [red]{job.error_message}[/red]")
    return 0 if job.state == inference_pb2.BATCH_JOB_STATE_SUCCEEDED else 1


def _list(console: Console, stub: Any, args: argparse.Namespace) -> int:
    state = inference_pb2.BATCH_JOB_STATE_UNSPECIFIED
    if args.state:
        state = inference_pb2.BatchJobState.Value(f"BATCH_JOB_STATE_{args.state.upper()}")
    reply = stub.ListBatchJobs(
        inference_pb2.ListBatchJobsRequest(page_size=max(1, min(args.limit, 500)), state=state)
    )
    table = Table(title="batch jobs, newest first")
    for column in ("name", "state", "mode", "done", "failed", "total", "model version"):
        table.add_column(column)
    for job in reply.jobs:
        table.add_row(
            job.name,
            _state(job),
            _mode(job),
            str(job.processed_count),
            str(job.failed_count),
            str(job.total_count),
            job.model_version,
        )
    console.print(table)
    return 0
