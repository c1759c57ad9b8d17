"""Backbone features, extracted once and cached in the object store.

A backbone's identity names everything its features depend on: the architecture, where its
weights come from and the input size, e.g. `densenet121.random-seed0.32x32` or
`densenet121.imagenet.32x32` (a weights file is named by its content hash). Its features live
under `arrays/features/{identity}/`:

    backbone.weights.h5   the exact backbone weights (so every worker, and the published
                          classifier, use the very network that produced the cached features)
    backbone.weights.sha256  the weights' SHA-256 (hex), so that publishing a head on them needs
                          neither the network nor its 28 MB (not `.json`: that names a shard)
    {shard}.npy           float32 (n, 1024): the features of n images
    {shard}.json          {"sha256": [...]}: which image each row is; written after the .npy,
                          so a shard whose .json exists is complete

A shard's id is derived from its images' hashes, so a retried task rewrites the same shard.
An image is looked up by SHA-256 across the shards; a second run on the same images finds every
one and extracts nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from imagemesh.errors import NotFound

__all__ = [
    "BackboneSpec",
    "Extractor",
    "FeatureCache",
    "FeatureStore",
    "backbone_weights_key",
    "backbone_weights_sha256",
    "load_backbone",
]

FEATURES_PREFIX = "arrays/features/"
_WEIGHTS = "backbone.weights.h5"
_WEIGHTS_DIGEST = "backbone.weights.sha256"


class FeatureStore(Protocol):
    """The part of `storage_service.backends.ObjectStore` the cache uses."""

    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def download_file(self, key: str, path: Path) -> None: ...
    def list_keys(self, prefix: str, start_after: str = "") -> Iterable[str]: ...
    def exists(self, key: str) -> bool: ...


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone: input size, weights (`imagenet`, a file, or None: random with `seed`)."""

    input_size: tuple[int, int] = (32, 32)
    weights: str | None = None
    seed: int = 0

    @property
    def weights_origin(self) -> str:
        """`imagenet`, `file-{hash}` or `random-seed{n}`."""
        if self.weights is None or self.weights == "none":
            return f"random-seed{self.seed}"
        if self.weights == "imagenet":
            return "imagenet"
        digest = hashlib.sha256(Path(self.weights).read_bytes()).hexdigest()[:16]
        return f"file-{digest}"

    @property
    def identity(self) -> str:
        """`densenet121.{weights origin}.{h}x{w}`: what the cached features depend on."""
        height, width = self.input_size
        return f"densenet121.{self.weights_origin}.{height}x{width}"

    @property
    def metadata_weights(self) -> str:
        """How a published version's metadata names the backbone weights."""
        from inference_service.model.densenet import weights_origin

        return weights_origin(self.weights)


def backbone_weights_key(spec: BackboneSpec) -> str:
    """Where the weights of `spec`'s backbone are stored (by `load_backbone`)."""
    return f"{FEATURES_PREFIX}{spec.identity}/{_WEIGHTS}"


def load_backbone(store: FeatureStore, spec: BackboneSpec) -> Any:
    """The backbone of `spec`, with the weights stored under its identity (stored first if new).

    Building a random backbone from a seed is deterministic only within one TensorFlow build;
    storing the weights makes the identity mean exactly one network everywhere.
    """
    import keras

    from inference_service.model.densenet import build_backbone

    key = backbone_weights_key(spec)
    if spec.weights is None:
        keras.utils.set_random_seed(spec.seed)
    backbone = build_backbone(spec.input_size, spec.weights)
    with tempfile.TemporaryDirectory(prefix="imagemesh-backbone-") as tmp:
        path = Path(tmp) / _WEIGHTS
        try:
            store.download_file(key, path)
            backbone.load_weights(path)
        except NotFound:
            backbone.save_weights(path)
            store.put_file(key, path)
        if not store.exists(_digest_key(spec)):
            _store_digest(store, spec, path)
    return backbone


def backbone_weights_sha256(store: FeatureStore, spec: BackboneSpec) -> str:
    """The SHA-256 of the stored weights of `spec`; `NotFound` if `load_backbone` never ran."""
    try:
        return store.get_bytes(_digest_key(spec)).decode().strip()
    except NotFound:
        pass
    # Weights stored before their digest was recorded: hashed once, recorded from now on.
    with tempfile.TemporaryDirectory(prefix="imagemesh-backbone-") as tmp:
        path = Path(tmp) / _WEIGHTS
        store.download_file(backbone_weights_key(spec), path)
        return _store_digest(store, spec, path)


def _digest_key(spec: BackboneSpec) -> str:
    return f"{FEATURES_PREFIX}{spec.identity}/{_WEIGHTS_DIGEST}"


def _store_digest(store: FeatureStore, spec: BackboneSpec, path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    store.put_bytes(_digest_key(spec), digest.encode())
    return digest


class Extractor:
    """Batched in-process feature extraction through one traced `tf.function`."""

    def __init__(self, backbone: Any, batch_size: int = 256) -> None:
        import tensorflow as tf

        self.backbone = backbone
        self.batch_size = batch_size
        height, width = backbone.input_shape[1:3]
        # A None batch dimension: one trace serves every batch size, the last short one too.
        self._call = tf.function(
            lambda pixels: backbone(pixels, training=False),
            input_signature=[tf.TensorSpec((None, height, width, 3), tf.float32)],
        )

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """float32 (n, 1024) features of (n, h, w, 3) pixels in [0, 255]."""
        out = []
        for start in range(0, len(pixels), self.batch_size):
            batch = pixels[start : start + self.batch_size].astype(np.float32)
            out.append(np.asarray(self._call(batch)))
        if not out:
            return np.zeros((0, int(self.backbone.output_shape[-1])), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def shard_id(shas: Sequence[str]) -> str:
    """A deterministic id for a shard of these images."""
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()[:32]


class FeatureCache:
    """The cached features of one backbone identity; see the module docstring."""

    def __init__(self, store: FeatureStore, identity: str, *, io_threads: int = 8) -> None:
        self._store = store
        self.identity = identity
        self.prefix = f"{FEATURES_PREFIX}{identity}/"
        self._io_threads = io_threads
        self._index: dict[str, tuple[str, int]] | None = None

    def index(self, refresh: bool = False) -> dict[str, tuple[str, int]]:
        """sha256 -> (shard id, row), from every complete shard."""
        if self._index is not None and not refresh:
            return self._index
        keys = [k for k in self._store.list_keys(self.prefix) if k.endswith(".json")]

        def read(key: str) -> tuple[str, list[str]]:
            shard = key[len(self.prefix) : -len(".json")]
            return shard, list(json.loads(self._store.get_bytes(key))["sha256"])

        index: dict[str, tuple[str, int]] = {}
        with ThreadPoolExecutor(self._io_threads) as pool:
            for shard, shas in pool.map(read, keys):
                for row, sha in enumerate(shas):
                    index.setdefault(sha, (shard, row))
        self._index = index
        return index

    def missing(self, shas: Iterable[str]) -> list[str]:
        """The images (in order, each once) with no cached features."""
        index = self.index()
        seen: set[str] = set()
        result = []
        for sha in shas:
            if sha not in index and sha not in seen:
                seen.add(sha)
                result.append(sha)
        return result

    def write_shard(self, shas: Sequence[str], features: np.ndarray) -> str:
        """Stores the features of `shas` (one row each) as a shard; returns its id."""
        if len(shas) != len(features):
            raise ValueError("one feature row per image is needed")
        shard = shard_id(shas)
        self._store.put_bytes(self.prefix + shard + ".npy", _npy(features.astype(np.float32)))
        # Last: the manifest makes the shard visible.
        self._store.put_bytes(
            self.prefix + shard + ".json", json.dumps({"sha256": list(shas)}).encode()
        )
        if self._index is not None:
            for row, sha in enumerate(shas):
                self._index.setdefault(sha, (shard, row))
        return shard

    def load(self, shas: Sequence[str]) -> np.ndarray:
        """float32 (len(shas), d) features in the order of `shas`; KeyError if one is missing."""
        index = self.index()
        locations = [index[sha] for sha in shas]
        shards = sorted({shard for shard, _ in locations})

        def read(shard: str) -> tuple[str, np.ndarray]:
            data = self._store.get_bytes(self.prefix + shard + ".npy")
            return shard, np.load(io.BytesIO(data), allow_pickle=False)

        with ThreadPoolExecutor(self._io_threads) as pool:
            arrays = dict(pool.map(read, shards))
        if not locations:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([arrays[shard][row] for shard, row in locations]).astype(np.float32)
