"""`make demo` step for the SearchService: a search with per-class counts.

If earlier steps (uploads through StorageService) indexed images, the step searches those;
otherwise it indexes a few documents with predictions itself, through IndexImages and
IndexPredictions, and says so.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys

import grpc
from rich.console import Console

from imagemesh.common.v1 import common_pb2
from imagemesh.search.v1 import search_pb2, search_pb2_grpc

__all__ = ["step_search"]

console = Console()

_CLASSES = ["cat", "dog", "bird", "car", "tree"]
_MODEL = "models/demo/versions/v1"


def _seed(stub: search_pb2_grpc.SearchServiceStub) -> None:
    docs, preds = [], []
    for i in range(15):
        kind = _CLASSES[i % 5]
        name = "images/" + hashlib.sha256(f"demo-{i}".encode()).hexdigest()
        docs.append(
            search_pb2.ImageDocument(
                name=name,
                filename=f"{kind}_{i:02d}.png",
                dataset="demo",
                label=kind,
                tags=["outdoor" if i % 2 else "indoor"],
                content_type="image/png",
                width=32,
                height=32,
            )
        )
        # A model that is right most of the time, with varied confidence.
        said = kind if i % 4 else _CLASSES[(i + 1) % 5]
        preds.append(
            search_pb2.ImagePrediction(
                image=name,
                prediction=common_pb2.Prediction(
                    model_version=_MODEL, top_class=said, confidence=0.55 + (i * 7 % 45) / 100
                ),
            )
        )
    wait = search_pb2.REFRESH_POLICY_WAIT_FOR
    stub.IndexImages(search_pb2.IndexImagesRequest(documents=docs, refresh=wait), timeout=30)
    stub.IndexPredictions(
        search_pb2.IndexPredictionsRequest(predictions=preds, refresh=wait), timeout=30
    )


def _cli(address: str, *args: str) -> None:
    command = [sys.executable, "-m", "imagemesh", "search", "--address", address, *args]
    console.print(f"$ imagemesh search {' '.join(args)}", style="bold")
    subprocess.run(command, check=True)


def step_search(address: str) -> None:
    """Searches what is indexed and shows the per-class counts."""
    with grpc.insecure_channel(address) as channel:
        stub = search_pb2_grpc.SearchServiceStub(channel)
        existing = stub.SearchImages(search_pb2.SearchImagesRequest(page_size=1), timeout=30)
        with_predictions = stub.SearchImages(
            search_pb2.SearchImagesRequest(
                page_size=1, filter=search_pb2.ImageFilter(prediction=search_pb2.PredictionFilter())
            ),
            timeout=30,
        )
        seeded = existing.total_size == 0 or with_predictions.total_size == 0
        if seeded:
            console.print(
                f"{existing.total_size} images indexed by earlier steps, "
                f"{with_predictions.total_size} with predictions: indexing 15 demo documents "
                "with predictions of a stand-in model through IndexImages/IndexPredictions "
                "so this step shows something real"
            )
            _seed(stub)
        else:
            console.print(f"searching the {existing.total_size} images earlier steps indexed")
    _cli(address, "--count-by", "predicted-class", "--page-size", "5")
    if seeded:
        # "Outdoor images the demo model calls cat or dog with confidence >= 0.6, surest first."
        _cli(
            address,
            "outdoor",
            *("--model-version", _MODEL, "--class", "cat", "--class", "dog"),
            *("--min-confidence", "0.6", "--order-by", "confidence desc"),
            *("--count-by", "label"),
        )
    else:
        _cli(address, "--count-by", "label", "--page-size", "5")
