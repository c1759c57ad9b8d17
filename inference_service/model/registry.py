"""Publishing and loading model versions in the object store.

The registry is the only code that knows the layout of `models/`; the trainer publishes through
it, the inference service and the CLI read through it. Versions are immutable once published:
their metadata is cached in memory. Every method is synchronous (object-store I/O and Keras
loading); async callers run them in a worker thread.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from imagemesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from imagemesh.names import parse_model_version

from .artifact import (
    HEAD_FILE,
    METADATA_FILE,
    MODEL_FILE,
    ModelMetadata,
    backbone_key,
    new_version_id,
    version_prefix,
)
from .densenet import (
    ARCHITECTURE,
    FEATURE_SIZE,
    PREPROCESSING,
    build_backbone,
    build_classifier,
)

__all__ = [
    "ModelObjectStore",
    "ModelRegistry",
    "load",
    "publish",
]


class ModelObjectStore(Protocol):
    """The part of the object store (`storage_service.backends.ObjectStore`) the registry uses."""

    def put_bytes(self, key: str, data: bytes) -> Any:
        """Stores `data` under `key`, replacing any object there."""

    def put_file(self, key: str, path: Path) -> Any:
        """Stores the file at `path` under `key`, streaming it."""

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes; raises `imagemesh.errors.NotFound` if there is none."""

    def download_file(self, key: str, path: Path) -> Any:
        """Writes the object to `path`; raises `imagemesh.errors.NotFound` if there is none."""

    def list_keys(self, prefix: str, start_after: str = "") -> Iterable[str]:
        """Every key starting with `prefix`, in key order, after `start_after`."""

    def exists(self, key: str) -> bool:
        """Whether an object has this key."""


def _check_part(value: str, what: str) -> None:
    # Reuses the resource-name grammar so that every published version can be named.
    parse_model_version(
        f"models/{value}/versions/x" if what == "model" else f"models/m/versions/{value}",
        field=what,
    )


class ModelRegistry:
    """Versions of models under `models/{model}/versions/{version}/` in one object store."""

    def __init__(self, store: ModelObjectStore) -> None:
        self._store = store
        # Published versions never change, so their metadata can be cached forever.
        self._metadata: dict[tuple[str, str], ModelMetadata] = {}

    # --- publishing ----------------------------------------------------------------------

    def publish(
        self,
        model: str,
        keras_model: Any,
        *,
        class_names: Sequence[str],
        backbone_weights: str,
        metrics: Mapping[str, float] | None = None,
        version: str | None = None,
        architecture: str = ARCHITECTURE,
        preprocessing: str = PREPROCESSING,
        description: str = "",
    ) -> ModelMetadata:
        """Saves `keras_model` as a new version and returns its metadata.

        The model must map pixels (batch, h, w, 3) in [0, 255] to one probability per class
        name. Raises `InvalidArgument` for a bad name or a model that does not match its
        class names, `AlreadyExists` if the version exists.
        """
        input_shape = tuple(keras_model.input_shape)
        if len(input_shape) != 4 or input_shape[3] != 3:
            raise InvalidArgument(
                f"the model must take (batch, height, width, 3) pixels, it takes {input_shape}"
            )
        metadata = self._new_metadata(
            model,
            version,
            keras_model,
            class_names=class_names,
            input_size=(int(input_shape[1]), int(input_shape[2])),
            backbone_weights=backbone_weights,
            metrics=metrics,
            architecture=architecture,
            preprocessing=preprocessing,
            description=description,
        )
        self._write(metadata, MODEL_FILE, keras_model)
        return metadata

    def publish_head(
        self,
        model: str,
        head: Any,
        *,
        backbone_sha256: str,
        input_size: tuple[int, int],
        class_names: Sequence[str],
        backbone_weights: str,
        metrics: Mapping[str, float] | None = None,
        version: str | None = None,
        description: str = "",
    ) -> ModelMetadata:
        """Publishes a trained head on stored DenseNet121 weights as a new version (format 2).

        `head` maps (batch, 1024) features to one probability per class name; the backbone is
        the weights stored by `put_backbone_weights` under `backbone_sha256`, taking pixels of
        `input_size`. Served, the version is `build_classifier(backbone, head)`: the same
        network as publishing the composed classifier, without saving the backbone again.
        `FailedPrecondition` if those weights are not stored.
        """
        if tuple(head.input_shape[1:]) != (FEATURE_SIZE,):
            raise InvalidArgument(
                f"a head must take (batch, {FEATURE_SIZE}) features, it takes {head.input_shape}"
            )
        if not self.has_backbone_weights(backbone_sha256):
            raise FailedPrecondition(
                f"no backbone weights are stored under {backbone_key(backbone_sha256)}; "
                "store them with put_backbone_weights first",
                reason="BACKBONE_WEIGHTS_MISSING",
            )
        metadata = self._new_metadata(
            model,
            version,
            head,
            class_names=class_names,
            input_size=input_size,
            backbone_weights=backbone_weights,
            metrics=metrics,
            architecture=ARCHITECTURE,
            preprocessing=PREPROCESSING,
            description=description,
            backbone_sha256=backbone_sha256,
        )
        self._write(metadata, HEAD_FILE, head)
        return metadata

    def put_backbone_weights(self, path: Path) -> str:
        """Stores a DenseNet121 weights file (`save_weights`) once; returns its SHA-256."""
        digest = _file_sha256(path)
        # Content-addressed: an object under this key already holds these very bytes.
        if not self.has_backbone_weights(digest):
            self._store.put_file(backbone_key(digest), path)
        return digest

    def has_backbone_weights(self, sha256: str) -> bool:
        """Whether backbone weights with this SHA-256 are stored."""
        return self._store.exists(backbone_key(sha256))

    def _new_metadata(
        self,
        model: str,
        version: str | None,
        keras_model: Any,
        *,
        class_names: Sequence[str],
        input_size: tuple[int, int],
        backbone_weights: str,
        metrics: Mapping[str, float] | None,
        architecture: str,
        preprocessing: str,
        description: str,
        backbone_sha256: str = "",
    ) -> ModelMetadata:
        _check_part(model, "model")
        version = version or new_version_id()
        _check_part(version, "version")
        outputs = tuple(keras_model.output_shape)[-1]
        if outputs != len(class_names) or len(set(class_names)) != len(class_names):
            raise InvalidArgument(
                f"the model has {outputs} outputs but {len(class_names)} class names "
                "were given (they must match, and be distinct)"
            )
        if self._store.exists(version_prefix(model, version) + METADATA_FILE):
            raise AlreadyExists(f"models/{model}/versions/{version} is already published")
        return ModelMetadata(
            model=model,
            version=version,
            class_names=tuple(class_names),
            input_height=input_size[0],
            input_width=input_size[1],
            architecture=architecture,
            backbone_weights=backbone_weights,
            preprocessing=preprocessing,
            create_time=datetime.now(UTC),
            metrics=dict(metrics or {}),
            description=description,
            backbone_sha256=backbone_sha256,
        )

    def _write(self, metadata: ModelMetadata, file_name: str, keras_model: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="imagemesh-publish-") as tmp:
            path = Path(tmp) / file_name
            keras_model.save(path)
            self._store.put_file(metadata.prefix + file_name, path)
        # Last: the metadata's presence is what makes the version visible.
        self._store.put_bytes(metadata.prefix + METADATA_FILE, metadata.to_json())
        self._metadata[(metadata.model, metadata.version)] = metadata

    # --- reading -------------------------------------------------------------------------

    def get(self, name: str) -> ModelMetadata:
        """The metadata of `models/{model}/versions/{version}`; `NotFound` if unpublished."""
        model, version = parse_model_version(name, field="name")
        cached = self._metadata.get((model, version))
        if cached is not None:
            return cached
        key = version_prefix(model, version) + METADATA_FILE
        try:
            data = self._store.get_bytes(key)
        except NotFound:
            raise NotFound(
                f"{name} is not published; list the published versions with "
                "`imagemesh models list`",
                reason="MODEL_VERSION_NOT_FOUND",
            ) from None
        metadata = ModelMetadata.from_json(data, where=key)
        self._metadata[(model, version)] = metadata
        return metadata

    def list_versions(self, model: str | None = None) -> list[ModelMetadata]:
        """Published versions (of `model`, or of every model), newest first."""
        if model is not None:
            _check_part(model, "model")
        prefix = f"models/{model}/versions/" if model else "models/"
        found: list[ModelMetadata] = []
        for key in self._store.list_keys(prefix):
            parts = key.split("/")
            # models/{model}/versions/{version}/metadata.json, nothing deeper.
            if len(parts) != 5 or parts[2] != "versions" or parts[4] != METADATA_FILE:
                continue
            try:
                found.append(self.get(f"models/{parts[1]}/versions/{parts[3]}"))
            except (InvalidArgument, FailedPrecondition, NotFound):
                # A folder that is not a valid version (bad name, corrupt metadata, deleted
                # since listed) must not hide the valid ones.
                continue
        found.sort(key=lambda m: (m.create_time, m.name), reverse=True)
        return found

    def latest(self, model: str) -> ModelMetadata | None:
        """The newest version of `model`, or None if it has none."""
        versions = self.list_versions(model)
        return versions[0] if versions else None

    def load(self, name: str) -> tuple[ModelMetadata, Any]:
        """The metadata and Keras model of a version.

        `NotFound` if it is not published; `FailedPrecondition` if its artifact cannot be
        loaded or does not match its metadata (the message says why).
        """
        metadata = self.get(name)
        file_name = HEAD_FILE if metadata.backbone_sha256 else MODEL_FILE
        with tempfile.TemporaryDirectory(prefix="imagemesh-model-") as tmp:
            path = Path(tmp) / file_name
            try:
                self._store.download_file(metadata.prefix + file_name, path)
            except NotFound:
                raise FailedPrecondition(
                    f"{name} has metadata but no {file_name}; publish it again",
                    reason="MODEL_ARTIFACT_MISSING",
                ) from None
            keras_model = _load_keras(path, name, file_name)
            if metadata.backbone_sha256:
                backbone = self._load_backbone(metadata, Path(tmp))
                keras_model = build_classifier(backbone, keras_model)
        _check_matches(keras_model, metadata)
        return metadata, keras_model

    def _load_backbone(self, metadata: ModelMetadata, folder: Path) -> Any:
        if not metadata.architecture.startswith("densenet121"):
            raise FailedPrecondition(
                f"{metadata.name} is a head on backbone weights, but its architecture "
                f"{metadata.architecture!r} has no backbone this server can build",
                reason="MODEL_ARTIFACT_INVALID",
            )
        key = backbone_key(metadata.backbone_sha256)
        path = folder / "backbone.weights.h5"
        try:
            self._store.download_file(key, path)
        except NotFound:
            raise FailedPrecondition(
                f"{metadata.name} needs the backbone weights {key}, which are not stored; "
                "publish the version again from the trainer",
                reason="MODEL_ARTIFACT_MISSING",
            ) from None
        if _file_sha256(path) != metadata.backbone_sha256:
            raise FailedPrecondition(
                f"the backbone weights {key} do not match their SHA-256; they were altered "
                "after publication",
                reason="MODEL_ARTIFACT_INVALID",
            )
        backbone = build_backbone((metadata.input_height, metadata.input_width), None)
        try:
            backbone.load_weights(path)
        except Exception as exc:  # Keras raises many types for a bad file; all mean "unusable".
            raise FailedPrecondition(
                f"{metadata.name}'s backbone weights {key} cannot be loaded: "
                f"{type(exc).__name__}: {exc}"[:1000],
                reason="MODEL_ARTIFACT_INVALID",
            ) from None
        return backbone


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_keras(path: Path, name: str, file_name: str) -> Any:
    import keras

    try:
        # safe_mode (the default) refuses artifacts that would run arbitrary code when loaded.
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file; all mean "unloadable".
        raise FailedPrecondition(
            f"{name}'s {file_name} cannot be loaded: {type(exc).__name__}: {exc}"[:1000],
            reason="MODEL_ARTIFACT_INVALID",
        ) from None


def _check_matches(keras_model: Any, metadata: ModelMetadata) -> None:
    expected_in = (metadata.input_height, metadata.input_width, 3)
    got_in = tuple(keras_model.input_shape[1:])
    got_out = keras_model.output_shape[-1]
    if got_in != expected_in or got_out != len(metadata.class_names):
        raise FailedPrecondition(
            f"{metadata.name}'s model takes {got_in} and gives {got_out} outputs, but its "
            f"metadata says {expected_in} and {len(metadata.class_names)} classes",
            reason="MODEL_ARTIFACT_MISMATCH",
        )


def publish(
    store: ModelObjectStore,
    model: str,
    keras_model: Any,
    *,
    class_names: Sequence[str],
    backbone_weights: str,
    metrics: Mapping[str, float] | None = None,
    version: str | None = None,
    description: str = "",
) -> ModelMetadata:
    """Publishes `keras_model` as a new version of `model` in `store` (see `ModelRegistry`)."""
    return ModelRegistry(store).publish(
        model,
        keras_model,
        class_names=class_names,
        backbone_weights=backbone_weights,
        metrics=metrics,
        version=version,
        description=description,
    )


def load(store: ModelObjectStore, name: str) -> tuple[ModelMetadata, Any]:
    """The metadata and Keras model of the version `name` in `store` (see `ModelRegistry`)."""
    return ModelRegistry(store).load(name)
