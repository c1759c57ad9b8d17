"""`make demo` steps for the InferenceService: make sure a model serves, classify a few images.

The demo's mesh starts on an empty data folder, so there is no model yet: this step publishes
an UNTRAINED DenseNet121 (random weights, with the generated dataset's five classes) through
`imagemesh models publish-random --select`, and says so. Its top-3 classes are therefore
arbitrary; the trainer publishes real models.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
from rich.console import Console
from rich.table import Table

from imagemesh.inference.v1 import inference_pb2, inference_pb2_grpc
from trainer.datasets import generate_images, to_png

__all__ = ["step_classify"]

console = Console()


def _ensure_model(stub: inference_pb2_grpc.InferenceServiceStub, address: str) -> str:
    versions = stub.ListModelVersions(inference_pb2.ListModelVersionsRequest(), timeout=30)
    serving = [v.name for v in versions.model_versions if v.serving]
    if serving:
        console.print(f"  serving {serving[0]}")
        return serving[0]
    if versions.model_versions:
        newest = versions.model_versions[0].name
        console.print(f"  nothing serving; selecting the newest version {newest}")
        stub.SelectModelVersion(inference_pb2.SelectModelVersionRequest(name=newest), timeout=600)
        return newest
    console.print(
        "  no model is published yet: publishing an [bold]UNTRAINED[/bold] DenseNet121 "
        "(random weights) so that the service can answer; its classes are arbitrary until "
        "the trainer publishes a trained model"
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "imagemesh",
            "models",
            "publish-random",
            "--select",
            "--address",
            address,
        ],
        check=True,
    )
    versions = stub.ListModelVersions(inference_pb2.ListModelVersionsRequest(), timeout=30)
    return next(v.name for v in versions.model_versions if v.serving)


def step_classify(address: str) -> None:
    """Classifies one generated image of each class and prints its top-3 classes."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        version = _ensure_model(stub, address)
        images = list(generate_images(5, seed=2026))
        requests = [
            inference_pb2.ClassifyStreamRequest(
                request_id=str(image.index),
                request=inference_pb2.ClassifyRequest(content=to_png(image.pixels), top_k=3),
            )
            for image in images
        ]
        answers = {a.request_id: a for a in stub.ClassifyStream(iter(requests), timeout=120)}
    table = Table(title=f"ClassifyStream with {version}: generated 32x32 images, top-3 classes")
    table.add_column("image (drawn shape)")
    table.add_column("top-3 classes")
    table.add_column("batch")
    for image in images:
        answer = answers[str(image.index)]
        if answer.HasField("error"):
            table.add_row(f"#{image.index} ({image.label})", answer.error.message, "")
            continue
        response = answer.response
        table.add_row(
            f"#{image.index} ({image.label})",
            ", ".join(f"{c.class_name} {c.probability:.1%}" for c in response.top_classes),
            str(response.batch_size),
        )
    console.print(table)
