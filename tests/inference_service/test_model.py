"""The DenseNet121 networks and the model registry (on a local-folder object store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imagemesh.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from inference_service.model import densenet
from inference_service.model.artifact import ModelMetadata
from inference_service.model.registry import ModelRegistry, load
from storage_service.backends.local import LocalObjectStore
from tests.inference_service.fixtures import CLASS_NAMES, TinyModels, publish, reference

PIXELS = np.random.default_rng(0).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)


def _backbone_and_head(classifier):
    return classifier.layers[1], classifier.layers[2]


def test_builtin_preprocessing_equals_keras_densenet_preprocess_input(
    tiny_models: TinyModels,
) -> None:
    backbone, _ = _backbone_and_head(tiny_models.first)
    scale, normalize = (
        backbone.get_layer("densenet_scale"),
        backbone.get_layer("densenet_normalize"),
    )
    ours = np.asarray(normalize(scale(PIXELS)))
    np.testing.assert_allclose(ours, densenet.preprocess_reference(PIXELS), atol=1e-5)


def test_backbone_gives_1024_features_and_the_head_probabilities(tiny_models: TinyModels) -> None:
    backbone, head = _backbone_and_head(tiny_models.first)
    features = np.asarray(backbone(PIXELS, training=False))
    assert features.shape == (4, densenet.FEATURE_SIZE)
    probabilities = np.asarray(head(features, training=False))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The classifier is exactly head(backbone(x)): what the trainer trains is what serves.
    composed = np.stack([reference(tiny_models.first)(p) for p in PIXELS])
    np.testing.assert_allclose(composed, probabilities, atol=1e-5)


def test_small_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 32x32"):
        densenet.build_backbone((16, 16))


def test_weights_origin_names() -> None:
    assert densenet.weights_origin(None) == "none"
    assert densenet.weights_origin("imagenet") == "imagenet"
    assert densenet.weights_origin("/x/densenet121_notop.h5") == "densenet121_notop.h5"


def test_a_missing_weights_file_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        densenet.build_backbone((32, 32), tmp_path / "nope.h5")


def test_publish_list_and_load_round_trip(tmp_path: Path, tiny_models: TinyModels) -> None:
    store = LocalObjectStore(tmp_path)
    registry = ModelRegistry(store)
    old = publish(registry, tiny_models.first, version="20250101-000000-000001")
    new = publish(registry, tiny_models.second, version="20250101-000000-000002")
    other = registry.publish(
        "other", tiny_models.first, class_names=CLASS_NAMES, backbone_weights="none"
    )
    assert [m.name for m in registry.list_versions("default")] == [new.name, old.name]
    assert [m.name for m in registry.list_versions()] == [other.name, new.name, old.name]
    assert registry.latest("default") == new
    assert registry.latest("missing") is None
    # A fresh registry reads what the first wrote.
    metadata, keras_model = load(store, old.name)
    assert metadata == old
    assert metadata.class_names == CLASS_NAMES
    np.testing.assert_allclose(
        reference(keras_model)(PIXELS[0]), reference(tiny_models.first)(PIXELS[0]), atol=1e-6
    )


def test_metadata_json_round_trips_and_rejects_garbage() -> None:
    from datetime import UTC, datetime

    metadata = ModelMetadata(
        model="m",
        version="v1",
        class_names=("a", "b"),
        input_height=32,
        input_width=32,
        architecture=densenet.ARCHITECTURE,
        backbone_weights="imagenet",
        preprocessing=densenet.PREPROCESSING,
        create_time=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        metrics={"val_accuracy": 0.76},
    )
    assert ModelMetadata.from_json(metadata.to_json(), where="x") == metadata
    with pytest.raises(FailedPrecondition, match="not valid"):
        ModelMetadata.from_json(b"{}", where="models/m/versions/v1/metadata.json")


def test_publishing_rules(tmp_path: Path, tiny_models: TinyModels) -> None:
    registry = ModelRegistry(LocalObjectStore(tmp_path))
    publish(registry, tiny_models.first, version="v1")
    with pytest.raises(AlreadyExists):
        publish(registry, tiny_models.first, version="v1")
    with pytest.raises(InvalidArgument, match="class names"):
        registry.publish("m", tiny_models.first, class_names=["a"], backbone_weights="none")
    with pytest.raises(InvalidArgument):
        registry.publish(
            "Bad Name", tiny_models.first, class_names=CLASS_NAMES, backbone_weights="none"
        )


def test_incomplete_or_corrupt_versions_do_not_hide_good_ones(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    store = LocalObjectStore(tmp_path)
    registry = ModelRegistry(store)
    good = publish(registry, tiny_models.first, version="v1")
    # A publish that died before its metadata, and one with corrupt metadata.
    store.put_bytes("models/default/versions/v2/model.keras", b"partial")
    store.put_bytes("models/default/versions/v3/model.keras", b"partial")
    store.put_bytes("models/default/versions/v3/metadata.json", b"{not json")
    assert [m.name for m in ModelRegistry(store).list_versions("default")] == [good.name]
    with pytest.raises(NotFound):
        registry.get("models/default/versions/v2")
    with pytest.raises(FailedPrecondition):
        ModelRegistry(store).get("models/default/versions/v3")


def test_an_artifact_that_does_not_match_its_metadata_is_refused(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    store = LocalObjectStore(tmp_path)
    registry = ModelRegistry(store)
    good = publish(registry, tiny_models.first, version="v1")
    lying = good.to_json().replace(b'"bird"', b'"bird", "fish"').replace(b'"v1"', b'"v2"')
    store.put_bytes(
        "models/default/versions/v2/model.keras", store.get_bytes(good.prefix + "model.keras")
    )
    store.put_bytes("models/default/versions/v2/metadata.json", lying)
    with pytest.raises(FailedPrecondition, match="metadata says"):
        registry.load("models/default/versions/v2")
    store.delete("models/default/versions/v3/model.keras")
    store.put_bytes(
        "models/default/versions/v3/metadata.json", good.to_json().replace(b'"v1"', b'"v3"')
    )
    with pytest.raises(FailedPrecondition, match=r"no model\.keras"):
        registry.load("models/default/versions/v3")


def _head_version(registry: ModelRegistry, tiny_models: TinyModels, tmp_path: Path, version: str):
    backbone, head = _backbone_and_head(tiny_models.first)
    weights = tmp_path / f"{version}.weights.h5"
    backbone.save_weights(weights)
    digest = registry.put_backbone_weights(weights)
    return registry.publish_head(
        "default",
        head,
        backbone_sha256=digest,
        input_size=(32, 32),
        class_names=CLASS_NAMES,
        backbone_weights="none",
        version=version,
    )


def test_a_head_on_stored_backbone_weights_serves_the_same_network(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    registry = ModelRegistry(store)
    first = _head_version(registry, tiny_models, tmp_path, "v1")
    second = _head_version(registry, tiny_models, tmp_path, "v2")
    assert first.format_version == 2
    assert first.backbone_sha256 == second.backbone_sha256
    # One copy of the weights however many versions sit on it; each version stores its head.
    assert list(store.list_keys("models/_backbones/")) == [
        f"models/_backbones/{first.backbone_sha256}.weights.h5"
    ]
    assert not store.exists(first.prefix + "model.keras")
    metadata, keras_model = load(store, first.name)
    assert metadata == first
    assert [m.name for m in registry.list_versions()] == [second.name, first.name]
    np.testing.assert_allclose(
        reference(keras_model)(PIXELS[1]), reference(tiny_models.first)(PIXELS[1]), atol=1e-5
    )


def test_a_head_without_its_backbone_weights_is_refused(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    registry = ModelRegistry(store)
    _, head = _backbone_and_head(tiny_models.first)
    with pytest.raises(FailedPrecondition, match="no backbone weights are stored"):
        registry.publish_head(
            "default",
            head,
            backbone_sha256="0" * 64,
            input_size=(32, 32),
            class_names=CLASS_NAMES,
            backbone_weights="none",
        )
    with pytest.raises(InvalidArgument, match="a head must take"):
        registry.publish_head(
            "default",
            tiny_models.first,
            backbone_sha256="0" * 64,
            input_size=(32, 32),
            class_names=CLASS_NAMES,
            backbone_weights="none",
        )
    assert not list(store.list_keys("models/default/"))


def test_altered_or_missing_backbone_weights_are_refused_at_load(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    good = _head_version(ModelRegistry(store), tiny_models, tmp_path, "v1")
    key = f"models/_backbones/{good.backbone_sha256}.weights.h5"
    original = store.get_bytes(key)
    store.put_bytes(key, original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(FailedPrecondition, match="altered after publication"):
        ModelRegistry(store).load(good.name)
    store.delete(key)
    with pytest.raises(FailedPrecondition, match="which are not stored"):
        ModelRegistry(store).load(good.name)


def test_head_metadata_round_trips_and_inconsistent_formats_are_refused(
    tmp_path: Path, tiny_models: TinyModels
) -> None:
    import json

    good = _head_version(
        ModelRegistry(LocalObjectStore(tmp_path / "objects")), tiny_models, tmp_path, "v1"
    )
    document = json.loads(good.to_json())
    assert document["format_version"] == 2
    assert ModelMetadata.from_json(good.to_json(), where="x") == good
    cases = [
        ({"format_version": 3}, "newer than this server reads"),
        ({"backbone_sha256": "../../x"}, "64 lowercase hex digits"),
        ({"format_version": 1}, "has no backbone"),
    ]
    for change, message in cases:
        with pytest.raises(FailedPrecondition, match=message):
            ModelMetadata.from_json(json.dumps({**document, **change}).encode(), where="x")
    del document["backbone_sha256"]
    with pytest.raises(FailedPrecondition, match="needs a backbone_sha256"):
        ModelMetadata.from_json(json.dumps(document).encode(), where="x")
