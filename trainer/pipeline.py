"""The whole training run: clean -> extract (cached) -> train -> evaluate -> publish.

`run_training` takes a dataset (labelled image hashes whose bytes are in the object store)
and returns a `TrainReport`. The stages:

1. clean: inspect every image (on Spark when a context is given, else in threads), drop
   undecodable images, exact duplicates and bad labels, split 80/20 per class, seeded.
2. extract: DenseNet121 features of every clean image not yet in the feature cache (on Spark
   or in process); a second run on the same images extracts nothing.
3. train: the Dense softmax head on cached features (`head.train_head`); with `fine_tune`,
   then the whole network on pixels, starting from that head; with `architecture="basic-cnn"`,
   the seed's baseline CNN on pixels instead (no features).
4. evaluate: accuracy, per-class precision/recall/F1, confusion matrix (JSON and PNG), from the
   validation predictions, which are stored too so the numbers can be recomputed.
5. publish: a new version `models/{model}/versions/{version}` through the inference registry
   (metrics in its metadata); the reports go to `reports/training/{model}/{version}/`.

Progress goes to a `Progress` sink, one stage at a time, so the CLI can draw bars.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from imagemesh.config import StorageSettings
from imagemesh.errors import NotFound

from .clean import CleanResult, Inspected, finish_clean
from .distributed import extract_local, extract_spark, inspect_local, inspect_spark, read_pixels
from .evaluate import Evaluation, evaluate, plot_confusion
from .features import (
    BackboneSpec,
    Extractor,
    FeatureCache,
    FeatureStore,
    backbone_weights_key,
    backbone_weights_sha256,
    load_backbone,
)
from .head import EpochStats, HeadConfig, train_head
from .images import LabelledImage
from .networks import (
    BASIC_CNN_ARCHITECTURE,
    FINE_TUNED_ARCHITECTURE,
    PixelTrainConfig,
    build_basic_cnn,
    train_on_pixels,
)

__all__ = [
    "STAGES",
    "NullProgress",
    "Progress",
    "TrainOptions",
    "TrainReport",
    "report_prefix",
    "run_training",
]

STAGES = ("clean", "extract", "train", "evaluate", "publish")
INSPECTIONS_PREFIX = "reports/inspections/"


class Progress(Protocol):
    """Where a run reports its progress; `total` None means unknown (a spinner)."""

    def start(self, stage: str, total: int | None) -> None:
        """A stage begins."""

    def advance(self, stage: str, amount: int = 1, note: str = "") -> None:
        """`amount` more units of the stage are done; `note` is a short status."""

    def finish(self, stage: str, summary: str) -> None:
        """The stage ended; `summary` says what it did in one line."""


class NullProgress:
    """Reports nothing."""

    def start(self, stage: str, total: int | None) -> None:
        """Does nothing."""

    def advance(self, stage: str, amount: int = 1, note: str = "") -> None:
        """Does nothing."""

    def finish(self, stage: str, summary: str) -> None:
        """Does nothing."""


@dataclass(frozen=True)
class TrainOptions:
    """What to train, and how."""

    model: str = "default"
    architecture: Literal["densenet121", "basic-cnn"] = "densenet121"
    fine_tune: bool = False
    # Backbone weights: None (random, seeded), "imagenet", or a weights file path.
    weights: str | None = None
    input_size: tuple[int, int] = (32, 32)
    seed: int = 0
    val_fraction: float = 0.2
    class_names: tuple[str, ...] | None = None
    head: HeadConfig = field(default_factory=HeadConfig)
    pixels: PixelTrainConfig = field(default_factory=PixelTrainConfig)
    fine_tune_learning_rate: float = 1e-4
    publish: bool = True
    description: str = ""


@dataclass
class TrainReport:
    """What a run did: every stage's figures, the evaluation, and the published version."""

    clean: dict[str, Any]
    class_names: tuple[str, ...]
    extracted: int
    cached: int
    best_val_accuracy: float
    best_epoch: int
    history: list[dict[str, float]]
    evaluation: Evaluation
    architecture: str
    model_version: str = ""
    report_prefix: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    head_val_accuracy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "model_version": self.model_version,
            "architecture": self.architecture,
            "class_names": list(self.class_names),
            "images_train": self.clean.get("train"),
            "images_val": self.clean.get("val"),
            "images_dropped": self.clean.get("images_dropped"),
            "features_extracted": self.extracted,
            "features_cached": self.cached,
            "best_epoch": self.best_epoch,
            "best_val_accuracy": self.best_val_accuracy,
            "head_val_accuracy": self.head_val_accuracy,
            "evaluation": self.evaluation.to_dict(),
            "stage_seconds": self.stage_seconds,
            "report_prefix": self.report_prefix,
        }


def report_prefix(model: str, version: str) -> str:
    """Where a version's training reports live in the object store."""
    return f"reports/training/{model}/{version}/"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _indices(records: Sequence[LabelledImage], names: tuple[str, ...]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(names)}
    return np.array([lookup[r.label] for r in records], dtype=np.int32)


class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._started = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()

    def stop(self, stage: str) -> None:
        self.seconds[stage] = round(time.perf_counter() - self._started, 3)


def run_training(
    records: Sequence[LabelledImage],
    *,
    store: FeatureStore,
    storage: StorageSettings,
    options: TrainOptions | None = None,
    spark_context: Callable[[], Any] | None = None,
    progress: Progress | None = None,
) -> TrainReport:
    """Runs every stage on `records`; see the module docstring.

    `spark_context` returns a live SparkContext (e.g. `SparkApp.context`); None runs the heavy
    stages in this process. Raises `InvalidArgument` when the clean dataset cannot be trained
    on (fewer than two classes, or a class with fewer than two images).
    """
    options = options or TrainOptions()
    progress = progress or NullProgress()
    clock = _Clock()
    spec = BackboneSpec(options.input_size, options.weights, options.seed)
    use_features = options.architecture == "densenet121"
    # Building DenseNet121 takes seconds. A run needs it to extract features or to fine-tune;
    # a head-only run on cached features does not (it publishes the head on the stored
    # weights). When it will likely be needed, it is built in the background from the start,
    # overlapping the clean stage (on Spark: the application's start). (Should cleaning fail,
    # the thread finishes a build nobody joins.)
    builder = ThreadPoolExecutor(1, thread_name_prefix="imagemesh-backbone")
    backbone_future: Future[Any] | None = None

    def backbone() -> Future[Any]:
        nonlocal backbone_future
        if backbone_future is None:
            backbone_future = builder.submit(load_backbone, store, spec)
        return backbone_future

    # 1. clean
    clock.start()
    progress.start("clean", len(records))
    cached_inspection = _cached_inspection(store, records, options.input_size)
    if use_features and (cached_inspection is None or options.fine_tune):
        # A dataset never inspected has never had its features extracted either.
        backbone()
    if cached_inspection is not None:
        inspected = cached_inspection
        progress.advance("clean", len(records), "from the inspection cache")
    else:
        if spark_context is not None:
            inspected = inspect_spark(spark_context(), storage, records, options.input_size)
            progress.advance("clean", len(records))
        else:
            inspected = inspect_local(
                store, records, options.input_size, lambda n: progress.advance("clean", n)
            )
        _store_inspection(store, records, options.input_size, inspected)
    cleaned: CleanResult = finish_clean(
        inspected,
        class_names=options.class_names,
        val_fraction=options.val_fraction,
        seed=options.seed,
    )
    names = cleaned.class_names
    progress.finish(
        "clean",
        f"{cleaned.report['images_kept']} kept, {cleaned.report['images_dropped']} dropped; "
        f"{len(cleaned.train)} train / {len(cleaned.val)} val over {len(names)} classes",
    )
    clock.stop("clean")
    train_shas = [r.sha256 for r in cleaned.train]
    val_shas = [r.sha256 for r in cleaned.val]
    y_train = _indices(cleaned.train, names)
    y_val = _indices(cleaned.val, names)

    # 2. extract
    clock.start()
    extracted = cached = 0
    cache = FeatureCache(store, spec.identity)
    if use_features:
        missing = cache.missing(train_shas + val_shas)
        if missing:
            # Joined first: it stores the weights under the identity, which the workers load.
            backbone().result()
        cached = len(set(train_shas + val_shas)) - len(missing)
        progress.start("extract", len(missing))
        if missing and spark_context is not None:
            # Spark starts only when there is work for it: a rerun on cached data never pays it.
            extracted = extract_spark(spark_context(), storage, spec, missing)
            progress.advance("extract", len(missing))
        elif missing:
            extracted = extract_local(
                store,
                spec,
                missing,
                extractor=Extractor(backbone().result()),
                progress=lambda n: progress.advance("extract", n),
            )
        progress.finish(
            "extract", f"{extracted} extracted, {cached} already cached ({spec.identity})"
        )
    else:
        progress.start("extract", 0)
        progress.finish("extract", "not needed: the basic CNN trains on pixels")
    clock.stop("extract")

    # 3. train
    clock.start()
    head_accuracy: float | None = None
    history: list[dict[str, float]] = []
    # What is published: the whole classifier, or (head-only runs) the head on stored weights.
    classifier: Any = None
    trained_head: Any = None
    if use_features:
        cache.index(refresh=True)
        x_train = cache.load(train_shas)
        x_val = cache.load(val_shas)
        epochs = options.head.epochs + (options.pixels.epochs if options.fine_tune else 0)
        progress.start("train", epochs)

        def on_head_epoch(stats: EpochStats) -> None:
            history.append(
                {
                    "phase": 0.0,
                    "epoch": float(stats.epoch),
                    "loss": stats.loss,
                    "val_accuracy": stats.val_accuracy,
                    "seconds": stats.seconds,
                }
            )
            progress.advance("train", 1, f"head epoch {stats.epoch}: val {stats.val_accuracy:.3f}")

        head_result = train_head(
            x_train,
            y_train,
            x_val,
            y_val,
            num_classes=len(names),
            config=options.head,
            on_epoch=on_head_epoch,
        )
        head_accuracy = head_result.best_val_accuracy
        best_accuracy, best_epoch = head_result.best_val_accuracy, head_result.best_epoch
        if options.fine_tune:
            from inference_service.model.densenet import build_classifier

            classifier = build_classifier(backbone().result(), head_result.head)
            pixels_train = read_pixels(store, train_shas, options.input_size)
            pixels_val = read_pixels(store, val_shas, options.input_size)
            tuned = train_on_pixels(
                classifier,
                pixels_train,
                y_train,
                pixels_val,
                y_val,
                config=PixelTrainConfig(
                    epochs=options.pixels.epochs,
                    batch_size=options.pixels.batch_size,
                    learning_rate=options.fine_tune_learning_rate,
                    patience=options.pixels.patience,
                    seed=options.seed,
                ),
                on_epoch=_pixel_epochs(history, progress, "fine-tune epoch"),
            )
            best_accuracy, best_epoch = tuned.best_val_accuracy, tuned.best_epoch
            probabilities = classifier.predict(pixels_val.astype(np.float32), verbose=0)
        else:
            trained_head = head_result.head
            probabilities = np.asarray(trained_head.predict(x_val, verbose=0))
        architecture = (
            FINE_TUNED_ARCHITECTURE if options.fine_tune else ("densenet121+dense-softmax")
        )
    else:
        pixels_train = read_pixels(store, train_shas, options.input_size)
        pixels_val = read_pixels(store, val_shas, options.input_size)
        progress.start("train", options.pixels.epochs)
        classifier = build_basic_cnn(len(names), options.input_size, seed=options.seed)
        result = train_on_pixels(
            classifier,
            pixels_train,
            y_train,
            pixels_val,
            y_val,
            config=options.pixels,
            on_epoch=_pixel_epochs(history, progress, "epoch"),
        )
        best_accuracy, best_epoch = result.best_val_accuracy, result.best_epoch
        probabilities = classifier.predict(pixels_val.astype(np.float32), verbose=0)
        architecture = BASIC_CNN_ARCHITECTURE
    progress.finish("train", f"best val accuracy {best_accuracy:.4f} at epoch {best_epoch}")
    clock.stop("train")

    # 4. evaluate
    clock.start()
    progress.start("evaluate", None)
    evaluation = evaluate(y_val, np.asarray(probabilities, dtype=np.float32), names)
    progress.finish(
        "evaluate", f"accuracy {evaluation.accuracy:.4f}, macro F1 {evaluation.macro_f1:.4f}"
    )
    clock.stop("evaluate")

    report = TrainReport(
        clean=cleaned.report,
        class_names=names,
        extracted=extracted,
        cached=cached,
        best_val_accuracy=best_accuracy,
        best_epoch=best_epoch,
        history=history,
        evaluation=evaluation,
        architecture=architecture,
        head_val_accuracy=head_accuracy,
    )

    # 5. publish
    clock.start()
    progress.start("publish", None)
    version = ""
    if options.publish:
        from inference_service.model.artifact import new_version_id
        from inference_service.model.registry import ModelRegistry

        version = new_version_id()
        prefix = report_prefix(options.model, version)
        # Reports first: once the version is visible, its evaluation is there to read.
        backbone_note = f", backbone {spec.weights_origin}" if use_features else ""
        _store_reports(
            store,
            prefix,
            report,
            y_val,
            probabilities,
            val_shas,
            title=f"{architecture}{backbone_note}: validation, {evaluation.count} images",
        )
        registry = ModelRegistry(store)
        metrics = {
            **evaluation.metrics(),
            "best_epoch": float(best_epoch),
            "train_images": float(len(train_shas)),
            "val_images": float(len(val_shas)),
        }
        description = (
            options.description
            or f"{architecture} trained on {len(train_shas)} images; reports in {prefix}"
        )
        if trained_head is not None:
            # Head only: the head goes on the very backbone weights that made the features.
            metadata = registry.publish_head(
                options.model,
                trained_head,
                backbone_sha256=_registered_backbone(store, registry, spec),
                input_size=options.input_size,
                class_names=names,
                backbone_weights=spec.metadata_weights,
                metrics=metrics,
                version=version,
                description=description,
            )
        else:
            metadata = registry.publish(
                options.model,
                classifier,
                class_names=names,
                backbone_weights=spec.metadata_weights if use_features else "none",
                metrics=metrics,
                version=version,
                architecture=architecture,
                preprocessing="densenet" if use_features else "rescale-1/255",
                description=description,
            )
        report.model_version = metadata.name
        report.report_prefix = prefix
        progress.finish("publish", f"published {metadata.name}")
    else:
        progress.finish("publish", "skipped (publish disabled)")
    clock.stop("publish")
    report.stage_seconds = clock.seconds
    builder.shutdown()
    return report


def _registered_backbone(store: FeatureStore, registry: Any, spec: BackboneSpec) -> str:
    """The SHA-256 of `spec`'s stored weights, copied into the model registry if new there."""
    digest = backbone_weights_sha256(store, spec)
    if not registry.has_backbone_weights(digest):
        with tempfile.TemporaryDirectory(prefix="imagemesh-backbone-") as tmp:
            path = Path(tmp) / "backbone.weights.h5"
            store.download_file(backbone_weights_key(spec), path)
            if registry.put_backbone_weights(path) != digest:
                raise RuntimeError(f"the stored weights of {spec.identity} changed while read")
    return str(digest)


def _inspection_key(records: Sequence[LabelledImage], size: tuple[int, int]) -> str:
    # Images are content-addressed and immutable, so inspecting the same (image, label) list at
    # the same size always finds the same: the result is cached under a digest of the list.
    digest = hashlib.sha256()
    for record in records:
        digest.update(f"{record.sha256}:{record.label}\n".encode())
    return f"{INSPECTIONS_PREFIX}{size[0]}x{size[1]}/{digest.hexdigest()}.json"


def _cached_inspection(
    store: FeatureStore, records: Sequence[LabelledImage], size: tuple[int, int]
) -> list[Inspected] | None:
    try:
        rows = json.loads(store.get_bytes(_inspection_key(records, size)))
    except NotFound:
        return None
    return [Inspected(*row) for row in rows]


def _store_inspection(
    store: FeatureStore,
    records: Sequence[LabelledImage],
    size: tuple[int, int],
    inspected: Sequence[Inspected],
) -> None:
    rows = [[i.sha256, i.label, i.pixel_hash, i.problem] for i in inspected]
    store.put_bytes(_inspection_key(records, size), json.dumps(rows).encode())


def _pixel_epochs(
    history: list[dict[str, float]], progress: Progress, label: str
) -> Callable[[int, dict[str, float]], None]:
    def on_epoch(epoch: int, logs: dict[str, float]) -> None:
        history.append({"phase": 1.0, "epoch": float(epoch), **logs})
        progress.advance("train", 1, f"{label} {epoch}: val {logs.get('val_accuracy', 0.0):.3f}")

    return on_epoch


def _store_reports(
    store: FeatureStore,
    prefix: str,
    report: TrainReport,
    y_val: np.ndarray,
    probabilities: Any,
    val_shas: Sequence[str],
    *,
    title: str,
) -> None:
    store.put_bytes(prefix + "clean.json", json.dumps(report.clean, indent=2).encode())
    store.put_bytes(prefix + "evaluation.json", report.evaluation.to_json())
    store.put_bytes(prefix + "history.json", json.dumps(report.history, indent=2).encode())
    store.put_bytes(prefix + "val_labels.npy", _npy(y_val.astype(np.int32)))
    store.put_bytes(
        prefix + "val_probabilities.npy", _npy(np.asarray(probabilities, dtype=np.float32))
    )
    store.put_bytes(prefix + "val_images.json", json.dumps(list(val_shas)).encode())
    with tempfile.TemporaryDirectory(prefix="imagemesh-report-") as tmp:
        path = plot_confusion(
            report.evaluation,
            Path(tmp) / "confusion.png",
            title=title,
        )
        store.put_file(prefix + "confusion.png", path)
