"""Shared pieces of the batch-job tests: a tiny published model, stored images, a search double.

`SearchServiceDouble` is a TEST DOUBLE of SearchService (IndexPredictions and SearchImages
only, in memory), used where a test needs to see exactly which predictions were indexed and
how many times; the tests that run the whole mesh use the real SearchService.
"""

from __future__ import annotations

import io
import shutil
import threading
from collections import Counter
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from PIL import Image

from imagemesh.config import StorageSettings
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from inference_service.batch.keys import image_object_key
from trainer.datasets import CLASS_NAMES, generate_array

MODEL_VERSION = "models/default/versions/tiny-1"


def png_bytes(index: int, seed: int = 7) -> bytes:
    """Image `index` of the generated 5-class set, as PNG bytes."""
    pixels = generate_array(index, seed=seed).pixels
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def put_images(store: Any, count: int, *, start: int = 0) -> list[str]:
    """Writes `count` distinct images straight into the object store; returns their names."""
    import hashlib

    names = []
    for index in range(start, start + count):
        data = png_bytes(index)
        sha = hashlib.sha256(data).hexdigest()
        store.put_bytes(image_object_key(sha), data, "image/png")
        names.append(f"images/{sha}")
    return names


def put_garbage(store: Any) -> str:
    """Stores bytes that are not an image under a valid image name; returns the name."""
    import hashlib

    data = b"this is not an image at all"
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(image_object_key(sha), data, "application/octet-stream")
    return f"images/{sha}"


def missing_name() -> str:
    """A well-formed image name that nothing is stored under."""
    return "images/" + "ab" * 32


def publish_tiny_model(root: Path) -> None:
    """Publishes an untrained 32x32 DenseNet121 (5 classes) as MODEL_VERSION under `root`."""
    from inference_service.model.densenet import build_untrained_classifier
    from inference_service.model.registry import ModelRegistry
    from storage_service.backends.local import LocalObjectStore

    model = build_untrained_classifier(len(CLASS_NAMES), (32, 32), seed=3)
    ModelRegistry(LocalObjectStore(root)).publish(
        "default",
        model,
        class_names=CLASS_NAMES,
        backbone_weights="none",
        version=MODEL_VERSION.rsplit("/", 1)[1],
        description="untrained batch-test model",
    )


def local_settings(root: Path) -> StorageSettings:
    """Storage settings for a local-folder store at `root`."""
    return StorageSettings(local_root=root)


def copy_tree(source_root: Path, target_root: Path) -> None:
    """Copies a local object folder (quicker than object by object)."""
    shutil.copytree(source_root / "models", target_root / "models", dirs_exist_ok=True)


@dataclass
class SearchServiceDouble(search_pb2_grpc.SearchServiceServicer):
    """TEST DOUBLE of SearchService: records IndexPredictions calls, answers SearchImages.

    `unknown` images get a per-item NOT_FOUND, as the real service answers for an image it
    has no document for.
    """

    documents: list[str] = field(default_factory=list)
    unknown: set[str] = field(default_factory=set)
    predictions: dict[tuple[str, str], Any] = field(default_factory=dict)
    index_calls: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def IndexPredictions(self, request: Any, context: Any) -> Any:
        errors = []
        indexed = 0
        with self.lock:
            for item in request.predictions:
                if item.image in self.unknown:
                    errors.append(
                        search_pb2.IndexItemError(
                            name=item.image,
                            error={
                                "code": "NOT_FOUND",
                                "reason": "IMAGE_NOT_INDEXED",
                                "message": "no document",
                            },
                        )
                    )
                    continue
                self.index_calls[item.image] += 1
                self.predictions[(item.image, item.prediction.model_version)] = item.prediction
                indexed += 1
        return search_pb2.IndexPredictionsResponse(indexed_count=indexed, errors=errors)

    def SearchImages(self, request: Any, context: Any) -> Any:
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = self.documents[start : start + size]
        token = str(start + size) if start + size < len(self.documents) else ""
        return search_pb2.SearchImagesResponse(
            documents=[search_pb2.ImageDocument(name=n) for n in page],
            next_page_token=token,
            total_size=len(self.documents),
        )


class DoubleServer:
    """Serves a `SearchServiceDouble` on a free loopback port (threads, no event loop)."""

    def __init__(self, double: SearchServiceDouble) -> None:
        self.double = double
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        search_pb2_grpc.add_SearchServiceServicer_to_server(double, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0)


def load_npy(data: bytes) -> np.ndarray:
    """A `.npy` file's array."""
    return np.load(io.BytesIO(data), allow_pickle=False)
