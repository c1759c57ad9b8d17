"""Image bytes to model input: formats, resizing, and the guards."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imagemesh.errors import InvalidArgument
from inference_service import decode
from inference_service.decode import ImageLimits, decode_image

LIMITS = ImageLimits(max_image_bytes=1_000_000, max_image_pixels=250_000)
PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# A PNG's signature and IHDR chunk (32x32, 8-bit RGB), without its pixel data.
_PNG_START = _encode(Image.fromarray(PIXELS), "PNG")[:33]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_decode_to_the_same_pixels(fmt: str) -> None:
    out = decode_image(_encode(Image.fromarray(PIXELS), fmt), (32, 32), LIMITS)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, PIXELS.astype(np.float32))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_close_to_the_pixels(fmt: str) -> None:
    # A smooth image: lossy codecs keep it close (random noise they would not).
    ramp = np.linspace(0, 255, 32, dtype=np.float32)
    smooth = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), axis=2)
    smooth = smooth.astype(np.uint8)
    out = decode_image(_encode(Image.fromarray(smooth), fmt, quality=95), (32, 32), LIMITS)
    assert out.shape == (32, 32, 3)
    assert np.abs(out - smooth).mean() < 4


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_any_colour_mode_becomes_rgb(mode: str) -> None:
    image = Image.fromarray(PIXELS).convert(mode) if mode != "I;16" else Image.new("I;16", (32, 32))
    fmt = "TIFF" if mode in {"CMYK", "I;16"} else "PNG"
    out = decode_image(_encode(image, fmt), (32, 32), LIMITS)
    assert out.shape == (32, 32, 3)


def _png_cases() -> list[tuple[str, bytes]]:
    rgb = Image.fromarray(PIXELS)
    palette = rgb.quantize(16)
    with_transparency = rgb.convert("P")
    with_transparency.info["transparency"] = 3
    return [
        ("RGB", _encode(rgb, "PNG")),
        ("RGBA", _encode(rgb.convert("RGBA"), "PNG")),
        ("L", _encode(rgb.convert("L"), "PNG")),
        ("LA", _encode(rgb.convert("LA"), "PNG")),
        ("1 bit", _encode(rgb.convert("1"), "PNG")),
        ("P 8 bits", _encode(rgb.convert("P"), "PNG")),
        ("P 4 bits", _encode(palette, "PNG", bits=4)),
        ("P with transparency", _encode(with_transparency, "PNG")),
        ("RGB 48x40, resized", _encode(rgb.resize((48, 40)), "PNG")),
        ("RGB 16x16, resized", _encode(rgb.resize((16, 16)), "PNG")),
    ]


@pytest.mark.parametrize(("case", "png"), _png_cases(), ids=[case for case, _ in _png_cases()])
def test_pngs_decode_through_libspng_to_pillows_pixels(case: str, png: bytes) -> None:
    header = decode._png_header(png)
    assert header is not None
    assert header[2] <= 8
    through_libspng = decode_image(png, (32, 32), LIMITS)
    through_pillow = decode._decode_encoded(png, (32, 32), LIMITS, "content")
    assert through_libspng.dtype == np.float32
    assert through_libspng.shape == (32, 32, 3)
    np.testing.assert_array_equal(through_libspng, through_pillow)


def test_16_bit_pngs_decode_through_pillow() -> None:
    gray16 = Image.fromarray((PIXELS[:, :, 0].astype(np.uint16) * 257).astype(np.uint16))
    png = _encode(gray16, "PNG")
    header = decode._png_header(png)
    assert header is not None
    assert header[2] == 16
    np.testing.assert_array_equal(
        decode_image(png, (32, 32), LIMITS),
        decode._decode_encoded(png, (32, 32), LIMITS, "content"),
    )


def test_images_are_resized_to_the_model_input() -> None:
    big = Image.fromarray(PIXELS).resize((300, 200))
    out = decode_image(_encode(big, "JPEG"), (32, 32), LIMITS)
    assert out.shape == (32, 32, 3)
    assert out.min() >= 0
    assert out.max() <= 255


def test_npy_arrays_uint8_float_gray_and_resized() -> None:
    np.testing.assert_array_equal(decode_image(_npy(PIXELS), (32, 32), LIMITS), PIXELS)
    as_float = decode_image(_npy(PIXELS.astype(np.float64) / 255), (32, 32), LIMITS)
    np.testing.assert_allclose(as_float, PIXELS, atol=1e-3)
    gray = decode_image(_npy(PIXELS[:, :, 0]), (32, 32), LIMITS)
    np.testing.assert_array_equal(gray[:, :, 2], PIXELS[:, :, 0])
    assert decode_image(_npy(PIXELS), (16, 24), LIMITS).shape == (16, 24, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "EMPTY_IMAGE"),
        (b"\x00" * 100, "UNDECODABLE_IMAGE"),
        (b"x" * 1_000_001, "IMAGE_TOO_LARGE"),
        (_encode(Image.fromarray(PIXELS), "PNG")[:80], "UNDECODABLE_IMAGE"),
        # A PNG header claiming a 0-pixel-wide image; then one whose pixel data is not zlib.
        (_PNG_START[:16] + bytes(4) + _PNG_START[20:], "EMPTY_IMAGE"),
        (
            _PNG_START + b"\x00\x00\x00\x10IDAT" + b"not zlib at all!" + bytes(4),
            "UNDECODABLE_IMAGE",
        ),
        (_encode(Image.new("RGB", (8, 8)), "GIF"), "UNSUPPORTED_IMAGE_FORMAT"),
        # 600x600 = 360,000 pixels over the 250,000 limit, a few hundred bytes of PNG.
        (_encode(Image.new("RGB", (600, 600)), "PNG"), "IMAGE_TOO_MANY_PIXELS"),
        (_npy(np.zeros((600, 500), np.uint8)), "IMAGE_TOO_MANY_PIXELS"),
        (_npy(np.zeros((4, 4, 4), np.uint8)), "INVALID_ARRAY_SHAPE"),
        (_npy(np.zeros((4, 4, 3), np.int64)), "INVALID_ARRAY_DTYPE"),
        (_npy(np.full((4, 4, 3), 2.0)), "INVALID_ARRAY_VALUES"),
        (_npy(np.full((4, 4, 3), np.nan)), "INVALID_ARRAY_VALUES"),
        (b"\x93NUMPY garbage", "UNDECODABLE_IMAGE"),
    ],
)
def test_bad_input_is_invalid_argument_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_image(data, (32, 32), LIMITS)
    assert info.value.reason == reason
    assert info.value.violations[0].field == "content"


def test_the_pixel_guard_runs_before_decoding() -> None:
    # A PNG that claims 20000x20000 (400 MP) would need 1.2 GB to decode; it is refused fast
    # from its header.
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 200_000
    with pytest.raises(InvalidArgument) as info:
        decode_image(bomb, (32, 32), ImageLimits(max_image_pixels=64_000_000))
    assert info.value.reason == "IMAGE_TOO_MANY_PIXELS"
