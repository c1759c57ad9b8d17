"""Shared pieces of the batch-job tests: a tiny published model and stored images. The real
SearchService that jobs index into is `tests.fixtures.served_search.ThreadedSearch`.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from imagemesh.config import StorageSettings
from inference_service.batch.keys import image_object_key
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


def load_npy(data: bytes) -> np.ndarray:
    """A `.npy` file's array."""
    return np.load(io.BytesIO(data), allow_pickle=False)
