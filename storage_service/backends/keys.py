"""The object-key rules every `ObjectStore` enforces, in one place."""

from __future__ import annotations

from imagemesh.errors import InvalidArgument

__all__ = ["MAX_KEY_BYTES", "validate_key"]

MAX_KEY_BYTES = 1024


def validate_key(key: str) -> str:
    """Returns `key` if it is a safe object key, else raises `InvalidArgument`.

    Safe means: 1 to 1,024 bytes of UTF-8, `/`-separated non-empty segments, no `.` or `..`
    segment, no NUL or backslash. These rules make a key a safe relative path on a local
    folder and an unambiguous key on S3 (which would otherwise accept `a//b` as distinct
    from `a/b`).
    """
    encoded = key.encode("utf-8", errors="replace")
    segments = key.split("/")
    if (
        not key
        or len(encoded) > MAX_KEY_BYTES
        or "\x00" in key
        or "\\" in key
        or any(s in {"", ".", ".."} for s in segments)
    ):
        raise InvalidArgument(
            "object key must be 1-1,024 bytes of /-separated non-empty segments with no '.' "
            f"or '..' segment, NUL or backslash; got {key[:100]!r}",
            reason="INVALID_OBJECT_KEY",
            field="key",
        )
    return key
