"""What a published model version is: its metadata, stored as `metadata.json` beside the model.

A version lives under `models/{model}/versions/{version}/` in the object store, in one of two
layouts:

    model.keras      format 1: the whole Keras 3 classifier (pixels in [0, 255] -> probabilities)
    head.keras       format 2: only the trained head (features -> probabilities); the frozen
                     backbone's weights are `models/_backbones/{sha256}.weights.h5`, named in the
                     metadata by their SHA-256
    metadata.json    this module's `ModelMetadata`, written last

Format 2 exists because a head-only training run changes a few kilobytes of a 28 MB network: every
version trained on the same backbone shares one stored copy of its weights, and publishing one
saves the head alone. The blob is content-addressed, so it never changes once written, and a
loader checks its hash. `_backbones` can never be a model's name (names start with [a-z0-9]).

`metadata.json` is written after the model file, so a version whose metadata exists is complete;
readers ignore folders without one (a publish that died halfway).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imagemesh.errors import FailedPrecondition
from imagemesh.names import model_version_name

__all__ = [
    "BACKBONES_PREFIX",
    "FORMAT_VERSION",
    "HEAD_FILE",
    "METADATA_FILE",
    "MODEL_FILE",
    "ModelMetadata",
    "backbone_key",
    "new_version_id",
    "version_prefix",
]

# The newest layout this code reads; each version is written in the oldest format that can hold
# it, so servers that predate format 2 keep reading whole-model versions.
FORMAT_VERSION = 2
MODEL_FILE = "model.keras"
HEAD_FILE = "head.keras"
METADATA_FILE = "metadata.json"
BACKBONES_PREFIX = "models/_backbones/"


def backbone_key(sha256: str) -> str:
    """Where the backbone weights with this SHA-256 (hex) are stored."""
    return f"{BACKBONES_PREFIX}{sha256}.weights.h5"


def version_prefix(model: str, version: str) -> str:
    """The object-store folder of a version, with its trailing slash."""
    return f"models/{model}/versions/{version}/"


def new_version_id(now: datetime | None = None) -> str:
    """A fresh version id that sorts by publication time: `20260101-120000-1a2b3c`."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class ModelMetadata:
    """Everything a server needs to know to serve a version, besides its weights."""

    model: str
    version: str
    class_names: tuple[str, ...]
    input_height: int
    input_width: int
    architecture: str
    # `imagenet`, a weights file's name, or `none` (randomly initialised backbone).
    backbone_weights: str
    # How inputs are preprocessed; `densenet` means it is built into the saved model's first
    # layers, so servers feed raw RGB pixels in [0, 255].
    preprocessing: str
    create_time: datetime
    metrics: Mapping[str, float] = field(default_factory=dict)
    description: str = ""
    # Empty: the version is one whole `model.keras` (format 1). Otherwise the SHA-256 of the
    # backbone weights its `head.keras` sits on (format 2).
    backbone_sha256: str = ""

    @property
    def format_version(self) -> int:
        """1 for a whole-model version, 2 for a head on shared backbone weights."""
        return 2 if self.backbone_sha256 else 1

    @property
    def name(self) -> str:
        """`models/{model}/versions/{version}`."""
        return model_version_name(self.model, self.version)

    @property
    def prefix(self) -> str:
        """The version's folder in the object store."""
        return version_prefix(self.model, self.version)

    def to_json(self) -> bytes:
        """The `metadata.json` bytes."""
        document: dict[str, Any] = {
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "class_names": list(self.class_names),
            "input_height": self.input_height,
            "input_width": self.input_width,
            "architecture": self.architecture,
            "backbone_weights": self.backbone_weights,
            "preprocessing": self.preprocessing,
            "metrics": dict(self.metrics),
            "create_time": self.create_time.astimezone(UTC).isoformat(),
            "description": self.description,
        }
        if self.backbone_sha256:
            document["backbone_sha256"] = self.backbone_sha256
        return json.dumps(document, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> ModelMetadata:
        """Parses `metadata.json`; `FailedPrecondition` naming `where` if it is not valid."""
        try:
            document = json.loads(data)
            format_version = int(document.get("format_version", 1))
            if format_version > FORMAT_VERSION:
                raise ValueError(
                    f"format_version {format_version} is newer than this server reads "
                    f"({FORMAT_VERSION}); upgrade the server"
                )
            created = datetime.fromisoformat(document["create_time"])
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            backbone_sha256 = _sha256_hex(document.get("backbone_sha256", ""))
            if (format_version >= 2) != bool(backbone_sha256):
                raise ValueError(
                    f"format_version {format_version} "
                    + ("needs a backbone_sha256" if format_version >= 2 else "has no backbone")
                )
            return cls(
                model=str(document["model"]),
                version=str(document["version"]),
                class_names=tuple(str(c) for c in document["class_names"]),
                input_height=int(document["input_height"]),
                input_width=int(document["input_width"]),
                architecture=str(document["architecture"]),
                backbone_weights=str(document["backbone_weights"]),
                preprocessing=str(document["preprocessing"]),
                metrics={str(k): float(v) for k, v in dict(document.get("metrics", {})).items()},
                create_time=created,
                description=str(document.get("description", "")),
                backbone_sha256=backbone_sha256,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FailedPrecondition(
                f"the model metadata at {where} is not valid: {exc}",
                reason="INVALID_MODEL_METADATA",
            ) from None


def _sha256_hex(value: object) -> str:
    # It becomes part of an object key: anything but 64 lowercase hex digits is refused.
    text = str(value)
    if text and (len(text) != 64 or any(c not in "0123456789abcdef" for c in text)):
        raise ValueError(f"backbone_sha256 must be 64 lowercase hex digits, got {text[:80]!r}")
    return text
