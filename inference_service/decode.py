"""Image bytes -> the model's input: RGB pixels resized to the model's size, float32 in [0, 255].

Accepted: PNG, JPEG, WebP, BMP and TIFF (the first frame of an animated or multi-page file), and
`.npy` arrays of shape (H, W, 3), (H, W, 1) or (H, W), uint8 in [0, 255] or float in [0, 1].
Guards, checked from the header before any pixel is decoded: the encoded size and the pixel
count (a small PNG can claim gigapixels: a decompression bomb). Everything wrong with the input
is an `InvalidArgument` whose message says what and by how much. The backbone's normalisation is
not applied here: it is built into the model (see `model.densenet`).

PNGs of 8 bits or fewer per sample (most datasets of small images) are decoded by libspng
(`pyspng`), every other image by Pillow. Pillow's PNG path runs its chunk parser in Python:
measured on a 32x32 RGB PNG, 80 us a decode in a loop and ~520 us for one decode after the
thread slept 12 ms (what a lone call sees: its code is no longer in the CPU's caches), against
26 and ~160 us through libspng. Both give the same pixels (tested per colour type and bit depth).
16-bit PNGs stay with Pillow, whose reduction to 8 bits libspng would not reproduce. libspng, as
pyspng sets it up, does not check chunk CRCs: a PNG whose pixels decode is accepted even if a
checksum is wrong.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, UnidentifiedImageError

from imagemesh.errors import InvalidArgument

__all__ = ["ACCEPTED_FORMATS", "ImageLimits", "decode_image"]

ACCEPTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF"})
_NPY_MAGIC = b"\x93NUMPY"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageLimits:
    """What the server accepts: encoded bytes and decoded pixels (width x height)."""

    max_image_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 64_000_000


def _invalid(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def decode_image(
    data: bytes,
    size: tuple[int, int],
    limits: ImageLimits,
    *,
    field: str = "content",
) -> np.ndarray:
    """Decodes `data` to float32 pixels of shape (height, width, 3) for `size` = (h, w)."""
    if not data:
        raise _invalid(f"{field} is empty: send the bytes of an image", "EMPTY_IMAGE", field)
    if len(data) > limits.max_image_bytes:
        raise _invalid(
            f"{field} is {len(data):,} bytes, over this server's limit of "
            f"{limits.max_image_bytes:,} bytes",
            "IMAGE_TOO_LARGE",
            field,
        )
    if data.startswith(_NPY_MAGIC):
        return _decode_npy(data, size, limits, field)
    header = _png_header(data)
    if header is not None and header[2] <= 8:
        return _decode_png(data, header, size, limits, field)
    return _decode_encoded(data, size, limits, field)


def _png_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, bits per sample) of a PNG, from its IHDR chunk (the format puts it
    first, at a fixed offset); None if `data` does not start as a PNG does."""
    if len(data) < 25 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height, data[24]


def _decode_png(
    data: bytes,
    header: tuple[int, int, int],
    size: tuple[int, int],
    limits: ImageLimits,
    field: str,
) -> np.ndarray:
    _check_pixels(header[0], header[1], limits, field)
    try:
        rgb: np.ndarray = pyspng.load(data, "RGB")
    except RuntimeError as exc:  # libspng's errors: truncated, corrupt, bad header values
        raise _invalid(f"{field} could not be decoded: {exc}", "UNDECODABLE_IMAGE", field) from None
    if rgb.shape[:2] == size:
        return rgb.astype(np.float32)
    # The same resize as the Pillow path's, on the same pixels.
    return _resized(Image.fromarray(rgb), size)


def _resized(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """`image` (RGB) at `size` = (h, w), bilinear, as float32 pixels."""
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _check_pixels(width: int, height: int, limits: ImageLimits, field: str) -> None:
    if width < 1 or height < 1:
        raise _invalid(f"{field} has no pixels ({width}x{height})", "EMPTY_IMAGE", field)
    if width * height > limits.max_image_pixels:
        raise _invalid(
            f"{field} is {width}x{height} = {width * height:,} pixels, over this server's limit "
            f"of {limits.max_image_pixels:,} (refused as a possible decompression bomb)",
            "IMAGE_TOO_MANY_PIXELS",
            field,
        )


def _decode_encoded(
    data: bytes, size: tuple[int, int], limits: ImageLimits, field: str
) -> np.ndarray:
    height, width = size
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's global one must not turn into a crash.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise _invalid(
                    f"{field} is a {image.format} image; accepted formats are "
                    f"{', '.join(sorted(ACCEPTED_FORMATS))} and .npy arrays",
                    "UNSUPPORTED_IMAGE_FORMAT",
                    field,
                )
            _check_pixels(image.width, image.height, limits, field)
            if image.format == "JPEG":
                # Lets libjpeg decode a big photo at a reduced scale still >= the model's size:
                # far less work and memory for the same resized result.
                image.draft("RGB", (width, height))
            image.seek(0)
            # An RGB image (most PNGs and JPEGs) is read as it is: converting makes a copy, a
            # fifth of the time a small image takes (decoding one is mostly Pillow's Python).
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            return _resized(rgb, size)
    except InvalidArgument:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own, higher limit, hit in `open` before ours could be checked.
        raise _invalid(
            f"{field} has too many pixels ({exc}); this server's limit is "
            f"{limits.max_image_pixels:,} (refused as a possible decompression bomb)",
            "IMAGE_TOO_MANY_PIXELS",
            field,
        ) from None
    except UnidentifiedImageError as exc:
        raise _invalid(
            f"{field} is not a decodable image ({exc}); send PNG, JPEG, WebP, BMP, TIFF or .npy",
            "UNDECODABLE_IMAGE",
            field,
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        # Pillow reports truncated or corrupt files with these.
        raise _invalid(f"{field} could not be decoded: {exc}", "UNDECODABLE_IMAGE", field) from None


def _decode_npy(data: bytes, size: tuple[int, int], limits: ImageLimits, field: str) -> np.ndarray:
    stream = io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(stream)
        if major == 1:
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as exc:
        raise _invalid(
            f"{field} is not a valid .npy file: {exc}", "UNDECODABLE_IMAGE", field
        ) from None
    shape_ok = len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))
    if not shape_ok:
        raise _invalid(
            f"{field} is an array of shape {shape}; expected (H, W, 3), (H, W, 1) or (H, W)",
            "INVALID_ARRAY_SHAPE",
            field,
        )
    _check_pixels(int(shape[1]), int(shape[0]), limits, field)
    if dtype != np.uint8 and dtype.kind != "f":
        raise _invalid(
            f"{field} has dtype {dtype}; expected uint8 in [0, 255] or float in [0, 1]",
            "INVALID_ARRAY_DTYPE",
            field,
        )
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise _invalid(
            f"{field} is not a valid .npy file: {exc}", "UNDECODABLE_IMAGE", field
        ) from None
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise _invalid(
                f"{field} is a float array with values outside [0, 1] (or NaN/inf); send "
                "floats in [0, 1] or uint8 in [0, 255]",
                "INVALID_ARRAY_VALUES",
                field,
            )
        pixels = array.astype(np.float32) * np.float32(255.0)
    else:
        pixels = array.astype(np.float32)
    height, width = size
    if pixels.shape[:2] == (height, width):
        return np.ascontiguousarray(pixels)
    # Resized channel by channel in Pillow's float mode: no rounding to uint8 on the way.
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize(
                (width, height), Image.Resampling.BILINEAR
            ),
            dtype=np.float32,
        )
        for c in range(3)
    ]
    return np.stack(channels, axis=2)
