"""A deterministic generator of a 5-class 32x32 image set that a CNN can learn.

Image `i` of a dataset generated with `seed` depends only on `(seed, i)`, so any slice of any
size can be produced on any worker and always comes out the same. The five classes are shapes
drawn in a random colour at a random place and size, on a noisy random background:

    circle, square, triangle, cross, ring

Colours, positions, sizes, background and noise vary per image, so a classifier has to learn
shape, not a colour or a pixel position. The label is `CLASS_NAMES[i % 5]` (balanced).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASS_NAMES", "GeneratedImage", "generate_array", "generate_images", "to_png"]

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring")


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image: its index, label and pixels (H, W, 3) uint8."""

    index: int
    label: str
    pixels: np.ndarray


def _rng(seed: int, index: int) -> np.random.Generator:
    # Independent, reproducible streams per (seed, index), whatever order images are made in.
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def generate_array(index: int, *, seed: int = 0, size: int = 32) -> GeneratedImage:
    """Image `index` of the dataset `seed`, as pixels."""
    rng = _rng(seed, index)
    label_index = index % len(CLASS_NAMES)
    background = rng.integers(0, 256, size=3)
    foreground = rng.integers(0, 256, size=3)
    # Keep enough contrast between shape and background for the shape to be visible.
    while np.abs(foreground.astype(int) - background.astype(int)).sum() < 200:
        foreground = rng.integers(0, 256, size=3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(0.22, 0.4) * size
    cx = rng.uniform(radius, size - radius)
    cy = rng.uniform(radius, size - radius)
    fill = tuple(int(c) for c in foreground)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    width = max(2, int(radius / 3))
    name = CLASS_NAMES[label_index]
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "square":
        draw.rectangle(box, fill=fill)
    elif name == "triangle":
        draw.polygon(
            [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=fill
        )
    elif name == "cross":
        draw.rectangle((cx - radius, cy - width / 2, cx + radius, cy + width / 2), fill=fill)
        draw.rectangle((cx - width / 2, cy - radius, cx + width / 2, cy + radius), fill=fill)
    else:  # ring
        draw.ellipse(box, outline=fill, width=width)
    pixels = np.asarray(image, dtype=np.int16)
    noise = rng.normal(0, 12, size=pixels.shape)
    noisy = np.clip(pixels + noise, 0, 255).astype(np.uint8)
    return GeneratedImage(index=index, label=name, pixels=noisy)


def to_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_images(
    count: int, *, seed: int = 0, start: int = 0, size: int = 32
) -> Iterator[GeneratedImage]:
    """Images `start` .. `start + count - 1` of the dataset `seed`."""
    for index in range(start, start + count):
        yield generate_array(index, seed=seed, size=size)
