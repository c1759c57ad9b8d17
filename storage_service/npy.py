"""Validation of `.npy` bytes: a real `.npy` file, a plain dtype, the expected dtype and shape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

import numpy as np

from imagemesh.errors import InvalidArgument

__all__ = ["HEADER_PROBE_BYTES", "NpyFacts", "parse_npy", "read_npy_header"]

# Enough for the header of any array with a sensible shape (numpy pads headers to 64 bytes;
# a 1.0 header holds at most 65,535). A longer header is read in full by the caller.
HEADER_PROBE_BYTES = 4096

_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class NpyFacts:
    """What a valid `.npy` file holds."""

    dtype: str
    shape: tuple[int, ...]


def read_npy_header(prefix: bytes) -> NpyFacts | None:
    """The dtype and shape in the header at the start of `prefix` (the first bytes of a
    trusted `.npy` object), or None when `prefix` stops before the header ends.

    Reads only the header, so listing large arrays costs a few KiB each, not their data.
    """
    from numpy.lib import format as npy_format

    stream = BytesIO(prefix)
    try:
        version = npy_format.read_magic(stream)
        if version == (1, 0):
            shape, _fortran, dtype = npy_format.read_array_header_1_0(
                stream, max_header_size=len(prefix)
            )
        elif version == (2, 0):
            shape, _fortran, dtype = npy_format.read_array_header_2_0(
                stream, max_header_size=len(prefix)
            )
        else:  # format 3.0 (utf-8 field names): no public header reader; parse it whole
            return None
    except (ValueError, EOFError):
        return None
    return NpyFacts(dtype=dtype.str, shape=tuple(int(n) for n in shape))


def _bad(message: str, reason: str = "INVALID_NPY", field: str = "npy_content") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field=field)


def parse_npy(
    content: bytes, *, expected_dtype: str = "", expected_shape: Sequence[int] = ()
) -> NpyFacts:
    """The dtype and shape of `content`; raises `InvalidArgument` unless it is a whole `.npy`
    file (format 1, 2 or 3) with a non-object dtype, exactly as long as its header says, and
    of the expected dtype and shape when those are given.
    """
    if not content.startswith(_MAGIC):
        raise _bad("npy_content is not a .npy file (it lacks the \\x93NUMPY magic)")
    stream = BytesIO(content)
    try:
        # allow_pickle=False refuses object arrays, which could run code when loaded.
        array = np.load(stream, allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise _bad(
                "npy_content holds an object array; only plain numeric, bool and string dtypes "
                "are accepted",
                "NPY_OBJECT_DTYPE",
            ) from exc
        raise _bad(f"npy_content is not a valid .npy file: {exc}") from exc
    except (OSError, EOFError, SyntaxError, TypeError) as exc:
        raise _bad(f"npy_content is not a valid .npy file: {exc}") from exc
    if not isinstance(array, np.ndarray):  # np.load also reads .npz archives
        raise _bad("npy_content is not a single .npy array")
    if stream.tell() != len(content):
        raise _bad(
            f"npy_content has {len(content) - stream.tell()} bytes after the array's data; "
            "it is not a valid .npy file"
        )
    facts = NpyFacts(dtype=array.dtype.str, shape=tuple(int(n) for n in array.shape))
    if expected_dtype:
        try:
            wanted = np.dtype(expected_dtype)
        except TypeError as exc:
            raise _bad(
                f"expected_dtype {expected_dtype[:50]!r} is not a numpy dtype string",
                "INVALID_DTYPE",
                "expected_dtype",
            ) from exc
        if wanted != array.dtype:
            raise _bad(
                f"the array's dtype is {facts.dtype}, expected {wanted.str}",
                "NPY_DTYPE_MISMATCH",
                "expected_dtype",
            )
    if expected_shape and tuple(expected_shape) != facts.shape:
        raise _bad(
            f"the array's shape is {list(facts.shape)}, expected {list(expected_shape)}",
            "NPY_SHAPE_MISMATCH",
            "expected_shape",
        )
    return facts
