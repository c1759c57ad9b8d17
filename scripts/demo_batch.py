"""`make demo` step for batch jobs: classify the demo dataset on Spark, then find the
predictions through search.

Runs the real command line (`imagemesh batch start --dataset ... --mode spark`, live progress
bar) against the demo's mesh, whose Spark is the embedded `local[*]`; then asks SearchService
for the images with a prediction by the job's model version, counted per predicted class, and
how many agree with their ground-truth label.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
from rich.console import Console
from rich.table import Table

from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from imagemesh.search.v1 import search_pb2, search_pb2_grpc

__all__ = ["step_batch"]

console = Console()

DATASET = "demo-shapes"


def step_batch(address: str) -> None:
    """Runs a Spark batch job over the demo dataset and searches its predictions."""
    console.print(
        f"  [bold]imagemesh batch start --dataset {DATASET} --mode spark[/bold] "
        "(the first Spark job starts the application: ~15 s)"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "imagemesh",
            "batch",
            "start",
            "--dataset",
            DATASET,
            "--mode",
            "spark",
            "--top-k",
            "3",
            "--request-id",
            "demo-batch-1",
            "--address",
            address,
        ],
        check=True,
    )
    with grpc.insecure_channel(address) as channel:
        jobs = inference_pb2_grpc.InferenceServiceStub(channel)
        job = jobs.ListBatchJobs(inference_pb2.ListBatchJobsRequest(page_size=1)).jobs[0]
        search = search_pb2_grpc.SearchServiceStub(channel)
        by_version = search_pb2.PredictionFilter(model_version=job.model_version)
        found = search.SearchImages(
            search_pb2.SearchImagesRequest(
                filter=search_pb2.ImageFilter(datasets=[DATASET], prediction=by_version),
                page_size=3,
                count_by=search_pb2.COUNT_FIELD_PREDICTED_CLASS,
            )
        )
        table = Table(title=f"{found.total_size} images predicted by {job.model_version}")
        table.add_column("predicted class")
        table.add_column("images", justify="right")
        table.add_column("agree with their label", justify="right")
        for count in found.counts:
            agree = search.SearchImages(
                search_pb2.SearchImagesRequest(
                    filter=search_pb2.ImageFilter(
                        datasets=[DATASET],
                        labels=[count.value],
                        prediction=search_pb2.PredictionFilter(
                            model_version=job.model_version, classes=[count.value]
                        ),
                    ),
                    page_size=1,
                )
            ).total_size
            table.add_row(count.value, str(count.count), str(agree))
        console.print(table)
        for document in found.documents:
            prediction = next(
                p for p in document.predictions if p.model_version == job.model_version
            )
            console.print(
                f"  {document.name[:23]}... label {document.label!r:10} -> "
                f"{prediction.top_class} ({prediction.confidence:.2f}), "
                f"array {prediction.probabilities_array[:40]}..."
            )
