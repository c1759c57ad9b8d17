"""The whole run in process on a local store: cache reuse, stored evaluation, published model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from imagemesh.config import StorageSettings
from inference_service.model.registry import ModelRegistry
from storage_service.backends.local import LocalObjectStore
from trainer import pipeline
from trainer.datasets import CLASS_NAMES
from trainer.distributed import read_pixels
from trainer.evaluate import evaluate
from trainer.head import HeadConfig
from trainer.images import put_generated
from trainer.networks import PixelTrainConfig
from trainer.pipeline import STAGES, TrainOptions, run_training


class _Recorder:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []

    def start(self, stage: str, total: int | None) -> None:
        self.started.append(stage)

    def advance(self, stage: str, amount: int = 1, note: str = "") -> None:
        assert stage == self.started[-1]

    def finish(self, stage: str, summary: str) -> None:
        self.finished.append(stage)


def _npy(store: LocalObjectStore, key: str) -> np.ndarray:
    return np.load(io.BytesIO(store.get_bytes(key)), allow_pickle=False)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[LocalObjectStore, StorageSettings, list]:
    settings = StorageSettings(local_root=tmp_path / "objects")
    store = LocalObjectStore(settings.local_root)
    return store, settings, put_generated(store, 100, seed=4)


def test_second_run_extracts_nothing_and_published_model_matches_stored_predictions(
    dataset: tuple[LocalObjectStore, StorageSettings, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, settings, records = dataset
    options = TrainOptions(model="shapes", head=HeadConfig(epochs=3, batch_size=32))
    progress = _Recorder()
    first = run_training(records, store=store, storage=settings, options=options, progress=progress)
    assert progress.started == list(STAGES) == progress.finished
    assert (first.extracted, first.cached) == (100, 0)

    def never_built(*_: object) -> None:
        raise AssertionError("a run on cached features must not build the backbone")

    # A spy, not a mock: the second run must publish without building DenseNet121 at all.
    monkeypatch.setattr(pipeline, "load_backbone", never_built)
    second = run_training(records, store=store, storage=settings, options=options)
    assert (second.extracted, second.cached) == (0, 100)
    # Same cached features, same seed: the same head.
    assert second.best_val_accuracy == first.best_val_accuracy
    # Both versions are a head on one shared copy of the backbone weights.
    registry = ModelRegistry(store)
    versions = [registry.get(r.model_version) for r in (first, second)]
    assert versions[0].backbone_sha256 == versions[1].backbone_sha256 != ""
    assert len(list(store.list_keys("models/_backbones/"))) == 1
    for version in versions:
        assert store.exists(version.prefix + "head.keras")
        assert not store.exists(version.prefix + "model.keras")

    prefix = second.report_prefix
    stored = json.loads(store.get_bytes(prefix + "evaluation.json"))
    labels = _npy(store, prefix + "val_labels.npy")
    probabilities = _npy(store, prefix + "val_probabilities.npy")
    recomputed = evaluate(labels, probabilities, tuple(CLASS_NAMES_SORTED))
    assert recomputed.to_dict() == stored
    assert store.get_bytes(prefix + "confusion.png").startswith(b"\x89PNG")
    assert json.loads(store.get_bytes(prefix + "clean.json"))["val"] == len(labels) == 20

    metadata, model = ModelRegistry(store).load(second.model_version)
    assert metadata.metrics["val_accuracy"] == pytest.approx(stored["accuracy"])
    assert metadata.class_names == CLASS_NAMES_SORTED
    val_shas = json.loads(store.get_bytes(prefix + "val_images.json"))
    served = model.predict(read_pixels(store, val_shas, (32, 32)).astype(np.float32), verbose=0)
    # The served classifier is the trained head on the very backbone that made the features.
    np.testing.assert_allclose(served, probabilities, atol=2e-4)


def test_basic_cnn_trains_on_pixels_and_publishes(
    dataset: tuple[LocalObjectStore, StorageSettings, list],
) -> None:
    store, settings, records = dataset
    report = run_training(
        records,
        store=store,
        storage=settings,
        options=TrainOptions(
            model="cnn", architecture="basic-cnn", pixels=PixelTrainConfig(epochs=1)
        ),
    )
    assert report.extracted == 0
    metadata, model = ModelRegistry(store).load(report.model_version)
    assert metadata.architecture == "basic-cnn"
    assert model.output_shape[-1] == 5
    assert not list(store.list_keys("arrays/features/"))


def test_fine_tune_trains_the_whole_network_from_the_trained_head(tmp_path: Path) -> None:
    settings = StorageSettings(local_root=tmp_path / "objects")
    store = LocalObjectStore(settings.local_root)
    records = put_generated(store, 30, seed=6)
    tuned = run_training(
        records,
        store=store,
        storage=settings,
        options=TrainOptions(
            model="shapes",
            fine_tune=True,
            head=HeadConfig(epochs=1, batch_size=32),
            pixels=PixelTrainConfig(epochs=1, batch_size=32),
        ),
    )
    # One head epoch on cached features, then one epoch of the whole network on pixels.
    assert [h["phase"] for h in tuned.history] == [0.0, 1.0]
    metadata, model = ModelRegistry(store).load(tuned.model_version)
    assert metadata.architecture.endswith("(fine-tuned)")
    assert model.output_shape[-1] == 5


CLASS_NAMES_SORTED = tuple(sorted(CLASS_NAMES))
