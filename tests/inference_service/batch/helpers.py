"""Shared pieces of the batch-job tests: a tiny published model, stored images, and the real
SearchService (SQLite) that jobs index their predictions into, read back over gRPC.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from PIL import Image

from imagemesh.common.v1 import common_pb2
from imagemesh.config import StorageSettings
from imagemesh.search.v1 import search_pb2, search_pb2_grpc
from inference_service.batch.keys import image_object_key
from tests.fixtures.served_search import ServedSearch
from trainer.datasets import CLASS_NAMES, generate_array

T = TypeVar("T")

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


class ThreadedSearch:
    """The real SearchService (`ServedSearch`: SQLite, its own port) on a loop of its own thread.

    The batch code is synchronous (blocking channels, Spark's worker processes): run on the
    test's event loop, the server would stall while a test waits on it. So it gets a loop in a
    thread, and the test drives and reads it with blocking calls. `stop` and `start` are a real
    outage and recovery on the same port and database.
    """

    def __init__(self, folder: Path) -> None:
        self._served = ServedSearch(folder)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="served-search", daemon=True
        )
        self._thread.start()
        self._channel: grpc.Channel | None = None

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(60)

    @property
    def address(self) -> str:
        return self._served.address

    def start(self) -> None:
        self._run(self._served.start())

    def stop(self) -> None:
        self._run(self._served.stop())

    def close(self) -> None:
        """Stops the server, then its loop and thread."""
        if self._channel is not None:
            self._channel.close()
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def _stub(self) -> search_pb2_grpc.SearchServiceStub:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return search_pb2_grpc.SearchServiceStub(self._channel)

    def index_images(self, names: list[str], dataset: str = "generated") -> None:
        """Indexes a document per image, as the storage service does when it stores one:
        predictions attach to existing documents only."""
        reply = self._stub().IndexImages(
            search_pb2.IndexImagesRequest(
                documents=[
                    search_pb2.ImageDocument(name=n, dataset=dataset, filename=f"{i}.png")
                    for i, n in enumerate(names)
                ],
                refresh=search_pb2.REFRESH_POLICY_WAIT_FOR,
            )
        )
        assert not reply.errors, reply.errors[:3]

    def documents(self) -> dict[str, search_pb2.ImageDocument]:
        """Every indexed document, by name."""
        return self._run(self._served.documents())

    def predictions_by(self, model_version: str) -> dict[str, list[common_pb2.Prediction]]:
        """For each document SearchImages finds with a prediction of `model_version`, its
        predictions of that version (one each unless a re-run added instead of replacing)."""
        found: dict[str, list[common_pb2.Prediction]] = {}
        token = ""
        while True:
            page = self._stub().SearchImages(
                search_pb2.SearchImagesRequest(
                    filter=search_pb2.ImageFilter(
                        prediction=search_pb2.PredictionFilter(model_version=model_version)
                    ),
                    page_size=1000,
                    page_token=token,
                )
            )
            for document in page.documents:
                found[document.name] = [
                    p for p in document.predictions if p.model_version == model_version
                ]
            token = page.next_page_token
            if not token:
                return found


def load_npy(data: bytes) -> np.ndarray:
    """A `.npy` file's array."""
    return np.load(io.BytesIO(data), allow_pickle=False)
