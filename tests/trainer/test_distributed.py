"""The Spark tasks' extraction code, run in process: batches, shards, read-ahead, partitioning."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagemesh.config import StorageSettings
from storage_service.backends.local import LocalObjectStore
from trainer import distributed
from trainer.distributed import _extract_partition, _partitions, read_pixels
from trainer.features import BackboneSpec, Extractor, FeatureCache, load_backbone
from trainer.images import image_key, put_generated


@pytest.mark.parametrize(
    ("count", "per_partition", "slots", "expected"),
    [
        (2048, 1024, 2, 2),  # exactly one wave
        (2500, 1024, 2, 4),  # 3 partitions would leave a core idle in the last wave
        (500, 1024, 2, 2),  # fewer images than a partition: still every slot
        (1, 1024, 2, 1),  # never more partitions than images
        (10, 3, 4, 4),
        (13, 3, 4, 8),
        (0, 16, 2, 1),
    ],
)
def test_partitions_fill_whole_waves_over_the_slots(
    count: int, per_partition: int, slots: int, expected: int
) -> None:
    assert _partitions(count, per_partition, slots) == expected


def test_a_partition_is_extracted_in_batches_into_shards_skipping_undecodable_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = StorageSettings(local_root=tmp_path / "objects")
    store = LocalObjectStore(storage.local_root)
    records = put_generated(store, 21, seed=5)
    broken = b"\x89PNG truncated"
    broken_sha = hashlib.sha256(broken).hexdigest()
    store.put_bytes(image_key(broken_sha), broken, "image/png")
    shas = [r.sha256 for r in records]
    spec = BackboneSpec((32, 32), None, seed=7)
    extractor = Extractor(load_backbone(store, spec), batch_size=4)
    # The worker's cached extractor, without the worker-process set-up (thread pools, gc).
    monkeypatch.setattr(distributed, "_worker_extractor", lambda *args: extractor)

    partition = [*shas[:10], broken_sha, *shas[10:]]
    counts = list(_extract_partition(storage, spec, 4, 8, iter(partition)))

    # Batches of 4 (3 in the one with the broken image), a shard once 8 or more are done.
    assert counts == [8, 11, 2]
    cache = FeatureCache(store, spec.identity)
    assert cache.missing(shas) == []
    assert broken_sha in cache.missing([broken_sha])
    expected = extractor.features(read_pixels(store, shas, (32, 32)))
    np.testing.assert_allclose(cache.load(shas), expected, rtol=1e-4, atol=1e-4)


def test_an_empty_partition_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = StorageSettings(local_root=tmp_path / "objects")

    def no_extractor(*args: Any) -> Extractor:
        raise AssertionError("an empty partition needs no backbone")

    monkeypatch.setattr(distributed, "_worker_extractor", no_extractor)
    spec = BackboneSpec((32, 32), None, seed=7)
    assert list(_extract_partition(storage, spec, 4, 8, iter([]))) == []
