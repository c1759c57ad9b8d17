"""Where batch and online classification store arrays, per model version and image.

The array names are deterministic, so classifying an image again with the same version (a
retried Spark task, a speculative one, a re-run job, an online `persist`) overwrites the same
object instead of adding one:

    arrays/predictions/{model}/{version}/{sha256}.npy   probabilities, float32 (num_classes,)
    arrays/inputs/{model}/{version}/{sha256}.npy        the model's input, float32 (h, w, 3)

Batch workers read images from and write arrays to the object store directly (through the
storage service they would add a hop per image), so they must follow the storage service's
object layout exactly: its `storage_service.layout` module is the one source of those keys,
and it is used here rather than copied.
"""

from __future__ import annotations

from imagemesh.names import array_key, parse_model_version
from storage_service import layout

__all__ = [
    "array_object_key",
    "image_object_key",
    "input_array_name",
    "prediction_array_name",
]


def prediction_array_name(model_version: str, sha256: str) -> str:
    """`arrays/predictions/{model}/{version}/{sha256}.npy`."""
    model, version = parse_model_version(model_version)
    return f"arrays/predictions/{model}/{version}/{sha256}.npy"


def input_array_name(model_version: str, sha256: str) -> str:
    """`arrays/inputs/{model}/{version}/{sha256}.npy`."""
    model, version = parse_model_version(model_version)
    return f"arrays/inputs/{model}/{version}/{sha256}.npy"


def array_object_key(array_name: str) -> str:
    """The object-store key of the array named `arrays/{key}`."""
    return layout.array_object_key(array_key(array_name))


def image_object_key(sha256: str) -> str:
    """The object-store key of the bytes of the image `images/{sha256}`."""
    return layout.image_key(sha256)
