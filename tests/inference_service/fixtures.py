"""Shared fixtures for inference tests: two tiny untrained classifiers, built once per session.

The models are real DenseNet121 classifiers at 32x32 with three classes and random weights
(`weights=None`): fast to build, and as much a DenseNet as the served one. TensorFlow runs on
one intra-op and one inter-op thread in tests: the machine's cores are shared.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from imagemesh.config import Settings, load_settings
from imagemesh.mesh import build_mesh
from imagemesh.server import MeshServer
from inference_service.model.artifact import ModelMetadata
from inference_service.model.registry import ModelRegistry
from inference_service.runtime import compile_model, configure_threads

CLASS_NAMES = ("cat", "dog", "bird")
INPUT_SIZE = (32, 32)


@dataclass
class TinyModels:
    """Two untrained classifiers with the same shape and different weights."""

    first: Any
    second: Any


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
    """Built once per session (about two seconds each)."""
    configure_threads(1, 2)
    from inference_service.model.densenet import build_untrained_classifier

    return TinyModels(
        first=build_untrained_classifier(len(CLASS_NAMES), INPUT_SIZE, seed=1),
        second=build_untrained_classifier(len(CLASS_NAMES), INPUT_SIZE, seed=2),
    )


def publish(
    registry: ModelRegistry, keras_model: Any, *, version: str | None = None
) -> ModelMetadata:
    """Publishes a tiny model as a version of `default`."""
    return registry.publish(
        "default",
        keras_model,
        class_names=CLASS_NAMES,
        backbone_weights="none",
        metrics={"val_accuracy": 0.25},
        version=version,
        description="untrained test model",
    )


def reference(keras_model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The in-process call the service must agree with: (h, w, 3) pixels -> probabilities."""
    run = compile_model(keras_model)
    return lambda pixels: run(pixels[None].astype(np.float32))[0]


def png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    """A distinct random RGB PNG per seed (deliberately not the model's size: it is resized)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def fast_settings(settings: Settings) -> Settings:
    """Settings for a fast test server: small batches, one TF thread per instance, two
    instances whatever the machine's cores (so concurrent batches are always exercised), no
    access log."""
    settings.server.access_log = False
    settings.inference.max_batch_size = 8
    settings.inference.max_queue_delay_ms = 2.0
    settings.inference.model_instances = 2
    settings.inference.intra_op_threads = 1
    settings.inference.inter_op_threads = 2
    return settings


def local_settings(root: Any) -> Settings:
    """Embedded settings whose object store is the folder `root`."""
    return fast_settings(
        load_settings(
            storage={"local_root": root / "objects"},
            search={"sqlite_path": root / "search.sqlite3"},
        )
    )


@pytest_asyncio.fixture
async def started() -> AsyncIterator[Callable[..., Any]]:
    """Starts inference-only servers on free ports; stops them after the test."""
    servers: list[MeshServer] = []

    async def start(settings: Settings, services: tuple[str, ...] = ("inference",)) -> str:
        server, port = build_mesh(settings, services, port=0)
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(grace=0)


async def start_alone(settings: Settings) -> tuple[MeshServer, str]:
    """Starts the inference service alone on a free port; the caller stops it."""
    server, port = build_mesh(settings, ("inference",), port=0)
    await server.start()
    return server, f"127.0.0.1:{port}"
