"""Cleaning: bad images and labels dropped with a reason, duplicates caught, split stratified."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagemesh.errors import InvalidArgument
from storage_service.backends.local import LocalObjectStore
from trainer.clean import Inspected, finish_clean, inspect_images
from trainer.datasets import generate_array, to_png
from trainer.images import LabelledImage, image_key, put_generated


def _put(store: LocalObjectStore, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(image_key(sha), data)
    return sha


def test_bad_images_duplicates_and_labels_are_dropped_with_reasons(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    good = put_generated(store, 20, seed=1)
    pixels = generate_array(0, seed=1).pixels
    # The same picture as good[0], encoded differently (JPEG would change pixels; BMP does not).
    bmp = io.BytesIO()
    Image.fromarray(pixels).save(bmp, format="BMP")
    same_picture = _put(store, bmp.getvalue())
    broken = _put(store, b"not an image at all")
    missing = "0" * 64
    records = [
        *good,
        LabelledImage(same_picture, good[0].label),
        LabelledImage(broken, "circle"),
        LabelledImage(missing, "circle"),
        LabelledImage(good[1].sha256, good[1].label),  # listed twice
        LabelledImage(_put(store, to_png(generate_array(50, seed=1).pixels)), ""),
    ]
    inspected = inspect_images(store, records, (32, 32))
    result = finish_clean(inspected, seed=0)
    dropped = result.report["dropped"]
    assert dropped["undecodable"]["examples"] == [broken]
    assert dropped["missing"]["examples"] == [missing]
    assert dropped["unlabelled"]["count"] == 1
    assert dropped["duplicate"]["count"] == 2
    assert result.report["images_kept"] == 20
    kept = {r.sha256 for r in result.train + result.val}
    assert len(kept) == 20
    assert broken not in kept
    assert json.loads(json.dumps(result.report)) == result.report


def test_copies_with_conflicting_labels_are_all_dropped() -> None:
    inspected = [Inspected(f"{i:064x}", ["a", "b"][i % 2], pixel_hash=f"p{i}") for i in range(8)]
    inspected.append(Inspected("f" * 64, "b", pixel_hash="p0"))  # same pixels as #0, label a
    result = finish_clean(inspected)
    assert result.report["dropped"]["conflicting_labels"]["count"] == 2
    assert result.report["images_kept"] == 7


def test_split_is_stratified_seeded_and_eighty_twenty() -> None:
    inspected = [
        Inspected(hashlib.sha256(str(i).encode()).hexdigest(), ["a", "b", "c"][i % 3], f"p{i}")
        for i in range(300)
    ]
    first = finish_clean(inspected, seed=5)
    again = finish_clean(list(reversed(inspected)), seed=5)
    other = finish_clean(inspected, seed=6)
    assert first.report["split"] == {n: {"train": 80, "val": 20} for n in ("a", "b", "c")}
    assert {r.sha256 for r in first.val} == {r.sha256 for r in again.val}
    assert {r.sha256 for r in first.val} != {r.sha256 for r in other.val}
    assert not {r.sha256 for r in first.val} & {r.sha256 for r in first.train}


def test_unknown_labels_are_dropped_when_classes_are_given() -> None:
    inspected = [Inspected(f"{i:064x}", ["a", "b", "zz"][i % 3], f"p{i}") for i in range(30)]
    result = finish_clean(inspected, class_names=("a", "b"))
    assert result.class_names == ("a", "b")
    assert result.report["dropped"]["unknown_label"]["count"] == 10


def test_a_dataset_with_one_class_is_refused_with_a_reason() -> None:
    inspected = [Inspected(f"{i:064x}", "a", f"p{i}") for i in range(5)]
    with pytest.raises(InvalidArgument, match="at least two classes"):
        finish_clean(inspected)


def test_pixels_decode_to_the_generated_array(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    (record,) = put_generated(store, 1, seed=2, start=3)
    data = store.get_bytes(image_key(record.sha256))
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decoded, generate_array(3, seed=2).pixels)
