"""Labelled images as the trainer sees them: a content hash, a label, and bytes in the store.

Images live in the object store as `images/{sha[:2]}/{sha256}` (StorageService's layout,
`storage_service/layout.py`); a dataset is a
list of `LabelledImage`s, whatever produced it (StorageService's ListImages, a generated set,
a folder import). Decoding is strict: anything Pillow cannot open as an image, or that does
not match its content hash, is `UndecodableImage`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .datasets import generate_images, to_png

__all__ = [
    "ImageReader",
    "LabelledImage",
    "UndecodableImage",
    "decode_pixels",
    "image_key",
    "put_generated",
    "sha256_hex",
    "unique_labels",
]


@dataclass(frozen=True)
class LabelledImage:
    """One image of a dataset: its SHA-256 (hex) and its ground-truth label ('' if unknown)."""

    sha256: str
    label: str


class UndecodableImage(ValueError):
    """The bytes are not an image this trainer can read."""


class ImageReader(Protocol):
    """The part of the object store the trainer reads images through."""

    def get_bytes(self, key: str) -> bytes:
        """The object; `imagemesh.errors.NotFound` if absent."""
        ...


class _ImageWriter(Protocol):
    def put_bytes(self, key: str, data: bytes, content_type: str = ...) -> None: ...


def image_key(sha256: str) -> str:
    """The object key of the bytes of the image `images/{sha256}`: StorageService's layout
    (`images/{sha[:2]}/{sha}`, a two-character fan-out), so the trainer and Spark workers read
    the very objects StorageService wrote."""
    return f"images/{sha256[:2]}/{sha256}"


def decode_pixels(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """(height, width, 3) uint8 RGB pixels, resized to `size` if needed; `UndecodableImage`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from None
    height, width = size
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def put_generated(
    store: _ImageWriter, count: int, *, seed: int = 0, start: int = 0
) -> list[LabelledImage]:
    """Writes generated images straight into the store; for benches and tests without a mesh.

    `imagemesh dataset generate` goes through StorageService instead, which also records the
    dataset and labels.
    """
    records: list[LabelledImage] = []
    for image in generate_images(count, seed=seed, start=start):
        data = to_png(image.pixels)
        sha = hashlib.sha256(data).hexdigest()
        store.put_bytes(image_key(sha), data, "image/png")
        records.append(LabelledImage(sha, image.label))
    return records


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def unique_labels(records: Iterable[LabelledImage]) -> tuple[str, ...]:
    """The distinct non-empty labels, sorted: the class names of a dataset."""
    return tuple(sorted({r.label for r in records if r.label}))
