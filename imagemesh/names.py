"""Resource names shared by the contracts, parsed and validated in one place.

images/{sha256}                        an image (lowercase hex SHA-256 of its bytes)
arrays/{key}                           a stored `.npy` array
models/{model}/versions/{version}      a model version
batchJobs/{job_id}                     a batch job
"""

from __future__ import annotations

import re

from imagemesh.errors import InvalidArgument

__all__ = [
    "array_key",
    "image_name",
    "image_sha256",
    "job_id",
    "job_name",
    "model_version_name",
    "parse_model_version",
    "validate_dataset",
]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_ARRAY_KEY = re.compile(r"[A-Za-z0-9._=-]+(/[A-Za-z0-9._=-]+)*\.npy")
_MODEL_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_DATASET = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def image_name(sha256: str) -> str:
    """`images/{sha256}`."""
    return f"images/{sha256}"


def image_sha256(name: str, *, field: str = "name") -> str:
    """The SHA-256 in `images/{sha256}`; raises `InvalidArgument` if malformed."""
    prefix, _, rest = name.partition("/")
    if prefix != "images" or not _SHA256.fullmatch(rest):
        raise InvalidArgument(
            f"{field} must be images/{{sha256}} with 64 lowercase hex digits, got {name[:100]!r}",
            reason="INVALID_IMAGE_NAME",
            field=field,
        )
    return rest


def array_key(name: str, *, field: str = "name") -> str:
    """The key in `arrays/{key}`; raises `InvalidArgument` if malformed or unsafe."""
    prefix, _, key = name.partition("/")
    segments = key.split("/")
    if (
        prefix != "arrays"
        or len(name.encode()) > 1024
        or not _ARRAY_KEY.fullmatch(key)
        or any(s in {".", ".."} for s in segments)
    ):
        raise InvalidArgument(
            f"{field} must be arrays/{{key}}: /-separated segments of [A-Za-z0-9._=-], no '.' "
            f"or '..' segment, ending in .npy, at most 1,024 bytes; got {name[:100]!r}",
            reason="INVALID_ARRAY_NAME",
            field=field,
        )
    return key


def model_version_name(model: str, version: str) -> str:
    """`models/{model}/versions/{version}`."""
    return f"models/{model}/versions/{version}"


def parse_model_version(name: str, *, field: str = "model_version") -> tuple[str, str]:
    """(model, version) from `models/{model}/versions/{version}`."""
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "models"
        or parts[2] != "versions"
        or not _MODEL_PART.fullmatch(parts[1])
        or not _MODEL_PART.fullmatch(parts[3])
    ):
        raise InvalidArgument(
            f"{field} must be models/{{model}}/versions/{{version}} (each part 1-63 of "
            f"[a-z0-9._-]), got {name[:100]!r}",
            reason="INVALID_MODEL_VERSION_NAME",
            field=field,
        )
    return parts[1], parts[3]


def job_name(job: str) -> str:
    """`batchJobs/{job_id}`."""
    return f"batchJobs/{job}"


def job_id(name: str, *, field: str = "name") -> str:
    """The id in `batchJobs/{job_id}`."""
    prefix, _, rest = name.partition("/")
    if prefix != "batchJobs" or not _JOB_ID.fullmatch(rest):
        raise InvalidArgument(
            f"{field} must be batchJobs/{{job_id}}, got {name[:100]!r}",
            reason="INVALID_JOB_NAME",
            field=field,
        )
    return rest


def validate_dataset(dataset: str, *, field: str = "dataset") -> str:
    """The dataset name (empty means `default`); `InvalidArgument` if a backend would reject it."""
    if not dataset:
        return "default"
    if not _DATASET.fullmatch(dataset):
        raise InvalidArgument(
            f"{field} must be 1-63 characters of [a-z0-9._-] starting with a letter or digit, "
            f"got {dataset[:100]!r}",
            reason="INVALID_DATASET",
            field=field,
        )
    return dataset
