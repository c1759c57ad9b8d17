"""Checks on what clients send: upload headers, and the image bytes themselves.

Every check raises `imagemesh.errors.InvalidArgument` (or `ResourceExhausted` for size
limits) with the offending field and a message a person can act on; nothing here touches
the store.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO

from PIL import Image, UnidentifiedImageError

from imagemesh.errors import InvalidArgument
from imagemesh.names import validate_dataset

__all__ = [
    "ImageFacts",
    "UploadFields",
    "probe_image",
    "validate_upload_fields",
]

_MAX_FILENAME_BYTES = 1024
_LABEL = re.compile(r"[A-Za-z0-9_.: -]{0,128}")
_ATTRIBUTE_KEY = re.compile(r"[a-z][a-z0-9_]{0,62}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TAGS = 32
_MAX_TAG_CHARS = 128
_MAX_ATTRIBUTES = 64
_MAX_ATTRIBUTE_VALUE_BYTES = 1024

# Pillow format name -> (media type, lowercase name). Only these are accepted.
_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "GIF": "image/gif",
}
_CONTENT_TYPE_ALIASES = {
    "image/jpg": "image/jpeg",
    "image/pjpeg": "image/jpeg",
    "image/x-png": "image/png",
    "image/x-ms-bmp": "image/bmp",
    "image/x-bmp": "image/bmp",
    "image/tif": "image/tiff",
}
# Images whose decoded pixels fit in this many bytes are fully decoded (which catches any
# truncation); larger ones are checked structurally without holding their pixels, so that a
# large upload does not cost the server its decoded size in memory.
_FULL_DECODE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class UploadFields:
    """The validated, normalised fields of an upload header."""

    filename: str
    dataset: str
    label: str
    tags: tuple[str, ...]
    attributes: dict[str, str]
    content_type: str
    expected_sha256: str
    expected_size_bytes: int


@dataclass(frozen=True)
class ImageFacts:
    """What the bytes turned out to be."""

    format: str  # lowercase Pillow format name
    content_type: str
    width: int
    height: int


def _filename(value: str) -> str:
    segments = value.split("/")
    problem = None
    if not value:
        problem = "is required"
    elif len(value.encode()) > _MAX_FILENAME_BYTES:
        problem = f"is {len(value.encode())} bytes; at most {_MAX_FILENAME_BYTES} are allowed"
    elif "\x00" in value:
        problem = "contains a NUL character"
    elif _CONTROL.search(value):
        problem = "contains a control character"
    elif ".." in segments:
        problem = "contains a '..' segment"
    elif "" in segments:
        problem = "contains an empty segment (a leading, trailing or doubled '/')"
    if problem:
        raise InvalidArgument(
            f"filename {problem}; got {value[:100]!r}",
            reason="INVALID_FILENAME",
            field="header.filename",
        )
    return value


def validate_upload_fields(
    *,
    filename: str,
    dataset: str,
    label: str,
    tags: Sequence[str],
    attributes: Mapping[str, str],
    content_type: str,
    expected_sha256: str,
    expected_size_bytes: int,
) -> UploadFields:
    """The header's fields, validated; raises `InvalidArgument` naming the first bad one."""
    name = _filename(filename)
    dataset = validate_dataset(dataset, field="header.dataset")
    if not _LABEL.fullmatch(label):
        raise InvalidArgument(
            f"label must be at most 128 characters of [A-Za-z0-9-_.: ], got {label[:100]!r}",
            reason="INVALID_LABEL",
            field="header.label",
        )
    if len(tags) > _MAX_TAGS:
        raise InvalidArgument(
            f"at most {_MAX_TAGS} tags are allowed, got {len(tags)}",
            reason="INVALID_TAGS",
            field="header.tags",
        )
    for tag in tags:
        if not tag or len(tag) > _MAX_TAG_CHARS or _CONTROL.search(tag):
            raise InvalidArgument(
                f"each tag must be 1-{_MAX_TAG_CHARS} characters without control characters, "
                f"got {tag[:100]!r}",
                reason="INVALID_TAGS",
                field="header.tags",
            )
    if len(attributes) > _MAX_ATTRIBUTES:
        raise InvalidArgument(
            f"at most {_MAX_ATTRIBUTES} attributes are allowed, got {len(attributes)}",
            reason="INVALID_ATTRIBUTES",
            field="header.attributes",
        )
    for key, value in attributes.items():
        if not _ATTRIBUTE_KEY.fullmatch(key):
            raise InvalidArgument(
                f"attribute keys must match [a-z][a-z0-9_]{{0,62}}, got {key[:100]!r}",
                reason="INVALID_ATTRIBUTES",
                field=f"header.attributes[{key[:64]}]",
            )
        if len(value.encode()) > _MAX_ATTRIBUTE_VALUE_BYTES:
            raise InvalidArgument(
                f"attribute {key!r} is {len(value.encode())} bytes; at most "
                f"{_MAX_ATTRIBUTE_VALUE_BYTES} are allowed",
                reason="INVALID_ATTRIBUTES",
                field=f"header.attributes[{key}]",
            )
    if expected_sha256 and not _SHA256.fullmatch(expected_sha256):
        raise InvalidArgument(
            f"expected_sha256 must be 64 lowercase hex digits, got {expected_sha256[:100]!r}",
            reason="INVALID_SHA256",
            field="header.expected_sha256",
        )
    if expected_size_bytes < 0:
        raise InvalidArgument(
            f"expected_size_bytes must not be negative, got {expected_size_bytes}",
            reason="INVALID_SIZE",
            field="header.expected_size_bytes",
        )
    normalised_type = content_type.strip().lower()
    if normalised_type in ("", "application/octet-stream"):
        normalised_type = ""
    normalised_type = _CONTENT_TYPE_ALIASES.get(normalised_type, normalised_type)
    if normalised_type and normalised_type not in _FORMATS.values():
        raise InvalidArgument(
            f"content_type {content_type[:100]!r} is not a supported image type; use one of "
            f"{', '.join(sorted(_FORMATS.values()))} or leave it empty",
            reason="UNSUPPORTED_CONTENT_TYPE",
            field="header.content_type",
        )
    return UploadFields(
        filename=name,
        dataset=dataset,
        label=label,
        tags=tuple(tags),
        attributes=dict(attributes),
        content_type=normalised_type,
        expected_sha256=expected_sha256,
        expected_size_bytes=expected_size_bytes,
    )


def _bad_image(message: str, reason: str = "INVALID_IMAGE") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field="content")


def probe_image(
    source: bytes | Path, *, max_pixels: int, declared_content_type: str = ""
) -> ImageFacts:
    """Checks that `source` is a whole, decodable image within `max_pixels`; says what it is.

    Refuses: unknown or unsupported formats, zero or oversized dimensions (a decompression
    bomb is refused from its header, before any pixel is decoded), truncated or corrupt data,
    and a `declared_content_type` other than the detected one. Images small enough are fully
    decoded; larger ones are verified structurally (PNG chunk CRCs through IEND, JPEG decoded
    at 1/8 scale) so memory stays bounded.
    """
    stream: IO[bytes] = (
        BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb")  # noqa: SIM115
    )
    try:
        with warnings.catch_warnings():
            # Our own limit applies below; Pillow's global one must not pre-empt it noisily.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            try:
                image = Image.open(stream, formats=tuple(_FORMATS))
            except Image.DecompressionBombError as exc:
                raise _bad_image(
                    f"the image has too many pixels (a likely decompression bomb): {exc}",
                    "IMAGE_TOO_LARGE",
                ) from exc
            except UnidentifiedImageError as exc:
                raise _bad_image(
                    "the bytes are not a decodable image in a supported format "
                    f"({', '.join(sorted(f.lower() for f in _FORMATS))})",
                    "UNSUPPORTED_IMAGE_FORMAT",
                ) from exc
            except (OSError, SyntaxError, ValueError) as exc:
                raise _bad_image(
                    f"the image is corrupt or truncated: {exc}", "CORRUPT_IMAGE"
                ) from exc
            with image:
                facts = _check(image, max_pixels, declared_content_type)
        return facts
    finally:
        stream.close()


def _check(image: Image.Image, max_pixels: int, declared: str) -> ImageFacts:
    fmt = str(image.format)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise _bad_image(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise _bad_image(
            f"the image is {width}x{height} = {width * height:,} pixels, over this server's "
            f"limit of {max_pixels:,} (a likely decompression bomb); downscale it",
            "IMAGE_TOO_LARGE",
        )
    content_type = _FORMATS[fmt]
    if declared and declared != content_type:
        raise InvalidArgument(
            f"content_type says {declared} but the bytes are {content_type}",
            reason="CONTENT_TYPE_MISMATCH",
            field="header.content_type",
        )
    bands = len(image.getbands())
    bytes_per_band = 2 if image.mode in ("I;16", "I;16B", "I;16L") else 1
    if image.mode in ("I", "F", "RGBA;16", "RGB;16"):
        bytes_per_band = 4
    try:
        if width * height * bands * bytes_per_band <= _FULL_DECODE_BYTES:
            image.load()
        elif fmt == "JPEG":
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
        else:
            image.verify()
    except Image.DecompressionBombError as exc:
        raise _bad_image(f"the image has too many pixels: {exc}", "IMAGE_TOO_LARGE") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise _bad_image(
            f"the image is truncated or corrupt and cannot be decoded: {exc}",
            "CORRUPT_IMAGE",
        ) from exc
    return ImageFacts(format=fmt.lower(), content_type=content_type, width=width, height=height)
