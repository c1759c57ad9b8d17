"""Where the storage service keeps what, in the object store (the source of truth).

    images/{sha[:2]}/{sha}                  an image's exact bytes, content-addressed by the
                                            lowercase hex SHA-256 of those bytes. Its user
                                            metadata `record` holds the image's metadata as
                                            base64url JSON (an `ImageRecord`), or `@sidecar`
                                            when that is too large for S3 metadata headers.
    images/{sha[:2]}/{sha}.json             the sidecar record, when there is one; written
                                            before the bytes commit, deleted after them.
    datasets/{dataset}/log/{ns}-{rand}.json dataset membership: a JSON list of
                                            `[sha, generation]` appended in batches. An entry
                                            counts only while the image exists with that
                                            dataset and generation, so entries of deleted or
                                            re-uploaded images are ignored (and dropped by
                                            `imagemesh reindex`, which rewrites the logs).
    links/{sha[:2]}/{sha}/{array_key}       an empty marker: `arrays/{array_key}` was derived
                                            from the image (`PutArray.image`); deleting the
                                            image deletes the array.
    arrays/{array_key}                      a `.npy` array; user metadata `dtype`, `shape`,
                                            `image`. Predictions live at
                                            `arrays/predictions/{model}/{version}/{sha}.npy`
                                            and model inputs at `arrays/inputs/...` (same
                                            pattern): deleting an image finds those by the
                                            pattern, linked or not.
    models/...                              the inference service's; never touched here.

The two-character fan-out keeps folders small on a local disk; on S3 it is harmless.
One image costs one object write (bytes and record together) plus a share of a batched
membership-log write, which is what lets bulk uploads outrun a client's sequential puts.
"""

from __future__ import annotations

import os
import time

__all__ = [
    "ARRAYS_PREFIX",
    "IMAGES_PREFIX",
    "DERIVED_PREFIXES",
    "INPUTS_PREFIX",
    "PREDICTIONS_PREFIX",
    "array_object_key",
    "dataset_log_key",
    "dataset_log_prefix",
    "image_key",
    "image_link_key",
    "image_links_prefix",
    "record_sidecar_key",
    "sha_from_image_key",
]

IMAGES_PREFIX = "images/"
ARRAYS_PREFIX = "arrays/"
PREDICTIONS_PREFIX = "arrays/predictions/"
INPUTS_PREFIX = "arrays/inputs/"
# Arrays derived per model version and image, at `{prefix}{model}/{version}/{sha}.npy`. Deleting
# an image finds them by that pattern, so their writers (batch jobs writing one per image) need
# no link marker: one object write per prediction instead of two.
DERIVED_PREFIXES = (PREDICTIONS_PREFIX, INPUTS_PREFIX)


def image_key(sha: str) -> str:
    """The key of an image's bytes."""
    return f"images/{sha[:2]}/{sha}"


def record_sidecar_key(sha: str) -> str:
    """The key of an image's sidecar record (only for records too large for metadata)."""
    return f"images/{sha[:2]}/{sha}.json"


def sha_from_image_key(key: str) -> str | None:
    """The SHA-256 of an image-bytes key, or None for any other key (e.g. a sidecar)."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == "images" and len(parts[2]) == 64 and "." not in parts[2]:
        return parts[2]
    return None


def dataset_log_prefix(dataset: str) -> str:
    """The prefix of a dataset's membership log segments."""
    return f"datasets/{dataset}/log/"


def dataset_log_key(dataset: str) -> str:
    """A new log segment key; keys sort in the order segments were written."""
    return f"{dataset_log_prefix(dataset)}{time.time_ns():020d}-{os.urandom(4).hex()}.json"


def image_links_prefix(sha: str) -> str:
    """The prefix of an image's derived-array markers."""
    return f"links/{sha[:2]}/{sha}/"


def image_link_key(sha: str, array_key: str) -> str:
    """The marker saying `arrays/{array_key}` was derived from image `sha`."""
    return f"{image_links_prefix(sha)}{array_key}"


def array_object_key(array_key: str) -> str:
    """The object key of the array `arrays/{array_key}`."""
    return f"{ARRAYS_PREFIX}{array_key}"
