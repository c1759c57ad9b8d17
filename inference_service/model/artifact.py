"""What a published model version is: its metadata, stored as `metadata.json` beside the model.

A version lives under `models/{model}/versions/{version}/` in the object store:

    model.keras      the Keras 3 saved classifier (pixels in [0, 255] -> probabilities)
    metadata.json    this module's `ModelMetadata`, written last

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
    "FORMAT_VERSION",
    "METADATA_FILE",
    "MODEL_FILE",
    "ModelMetadata",
    "new_version_id",
    "version_prefix",
]

FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"


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
    format_version: int = FORMAT_VERSION

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
                format_version=format_version,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FailedPrecondition(
                f"the model metadata at {where} is not valid: {exc}",
                reason="INVALID_MODEL_METADATA",
            ) from None
