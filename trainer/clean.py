"""Cleaning a labelled dataset: drop what cannot be trained on, report, split.

Two halves, so the heavy one can run anywhere (in process or on Spark workers):

- `inspect_images` (per image, parallel): read the bytes, check them against their content
  hash, decode them, and hash the decoded pixels, so that the same picture stored in two
  encodings is caught as an exact duplicate too.
- `finish_clean` (driver, cheap): drops undecodable and unlabelled images, images whose label
  is not a known class, and exact duplicates (the first by hash is kept; if copies carry
  different labels, every copy is dropped: the truth is unknown). Then it reports the class
  histogram and splits each class, seeded, into train and validation (80/20 by default), so
  both sides keep the class proportions.

The report (`CleanResult.report`) is a JSON-ready dict: counts, every drop reason with a few
examples, the histogram before and after, and the split sizes per class.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from imagemesh.errors import InvalidArgument, NotFound

from .images import ImageReader, LabelledImage, UndecodableImage, decode_pixels, image_key

__all__ = ["CleanResult", "Inspected", "finish_clean", "inspect_image", "inspect_images"]

_EXAMPLES = 10


@dataclass(frozen=True)
class Inspected:
    """What reading one image found: its pixel hash, or the problem ('' when fine)."""

    sha256: str
    label: str
    pixel_hash: str = ""
    problem: str = ""


@dataclass
class CleanResult:
    """The split of the clean images, the class names (sorted), and the report."""

    class_names: tuple[str, ...]
    train: list[LabelledImage]
    val: list[LabelledImage]
    report: dict[str, Any] = field(default_factory=dict)


def inspect_image(store: ImageReader, record: LabelledImage, size: tuple[int, int]) -> Inspected:
    """Reads and decodes one image; never raises for a bad image (it reports the problem)."""
    try:
        data = store.get_bytes(image_key(record.sha256))
    except NotFound:
        return Inspected(record.sha256, record.label, problem="missing")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        return Inspected(record.sha256, record.label, problem="hash_mismatch")
    try:
        pixels = decode_pixels(data, size)
    except UndecodableImage:
        return Inspected(record.sha256, record.label, problem="undecodable")
    digest = hashlib.sha256(pixels.tobytes()).hexdigest()
    return Inspected(record.sha256, record.label, pixel_hash=digest)


def inspect_images(
    store: ImageReader,
    records: Iterable[LabelledImage],
    size: tuple[int, int],
    *,
    io_threads: int = 8,
) -> list[Inspected]:
    """`inspect_image` over many images, reading in threads; order preserved."""
    with ThreadPoolExecutor(io_threads) as pool:
        return list(pool.map(lambda r: inspect_image(store, r, size), records))


def _split_key(seed: int, sha256: str) -> str:
    # A seeded, order-independent shuffle: the same images always split the same way.
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def finish_clean(
    inspected: Sequence[Inspected],
    *,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> CleanResult:
    """Drops, reports and splits; see the module docstring.

    `class_names` restricts the classes (other labels are dropped); None takes every label
    seen. `InvalidArgument` if fewer than two classes remain or a class has fewer than two
    images (it could not appear on both sides of the split).
    """
    if not 0.0 < val_fraction < 1.0:
        raise InvalidArgument("val_fraction must be between 0 and 1", field="val_fraction")
    dropped: dict[str, list[str]] = defaultdict(list)
    histogram_in = Counter(i.label or "(unlabelled)" for i in inspected)
    known = set(class_names) if class_names is not None else None
    candidates: list[Inspected] = []
    seen_sha: set[str] = set()
    for item in inspected:
        if item.problem:
            dropped[item.problem].append(item.sha256)
        elif not item.label:
            dropped["unlabelled"].append(item.sha256)
        elif known is not None and item.label not in known:
            dropped["unknown_label"].append(item.sha256)
        elif item.sha256 in seen_sha:
            dropped["duplicate"].append(item.sha256)
        else:
            seen_sha.add(item.sha256)
            candidates.append(item)
    by_pixels: dict[str, list[Inspected]] = defaultdict(list)
    for item in candidates:
        by_pixels[item.pixel_hash].append(item)
    kept: list[LabelledImage] = []
    for copies in by_pixels.values():
        copies.sort(key=lambda i: i.sha256)
        if len({c.label for c in copies}) > 1:
            dropped["conflicting_labels"].extend(c.sha256 for c in copies)
            continue
        kept.append(LabelledImage(copies[0].sha256, copies[0].label))
        dropped["duplicate"].extend(c.sha256 for c in copies[1:])
    names = tuple(sorted(known if known is not None else {r.label for r in kept}))
    per_class: dict[str, list[LabelledImage]] = {name: [] for name in names}
    for record in kept:
        per_class[record.label].append(record)
    problems = [
        f"{name} ({len(items)} images)" for name, items in per_class.items() if len(items) < 2
    ]
    if len(names) < 2 or problems:
        raise InvalidArgument(
            "a training set needs at least two classes with at least two clean images each; "
            f"classes: {', '.join(names) or 'none'}"
            + (f"; too small: {', '.join(problems)}" if problems else ""),
            field="dataset",
        )
    train: list[LabelledImage] = []
    val: list[LabelledImage] = []
    split: dict[str, dict[str, int]] = {}
    for name, items in per_class.items():
        items.sort(key=lambda r: _split_key(seed, r.sha256))
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val.extend(items[:n_val])
        train.extend(items[n_val:])
        split[name] = {"train": len(items) - n_val, "val": n_val}
    report = {
        "images_in": len(inspected),
        "images_kept": len(kept),
        "images_dropped": sum(len(v) for v in dropped.values()),
        "dropped": {
            reason: {"count": len(shas), "examples": shas[:_EXAMPLES]}
            for reason, shas in sorted(dropped.items())
        },
        "class_names": list(names),
        "histogram_in": dict(sorted(histogram_in.items())),
        "histogram_kept": {name: len(items) for name, items in per_class.items()},
        "split": split,
        "val_fraction": val_fraction,
        "seed": seed,
        "train": len(train),
        "val": len(val),
    }
    return CleanResult(class_names=names, train=train, val=val, report=report)
