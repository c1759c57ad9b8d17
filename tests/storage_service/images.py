"""Small real images for tests, made with Pillow."""

from __future__ import annotations

import hashlib
import io
import random

from PIL import Image


def png(size: int = 32, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """A `size`x`size` image of random pixels (distinct bytes per seed)."""
    rng = random.Random(seed)
    image = Image.frombytes(
        mode, (size, size), bytes(rng.getrandbits(8) for _ in range(size * size * len(mode)))
    )
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels: a decompression bomb."""
    image = Image.new("1", (width, height))
    out = io.BytesIO()
    image.save(out, "PNG", optimize=True)
    return out.getvalue()
