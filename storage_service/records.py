"""An image's metadata as the storage service keeps it, and its (de)serialisation."""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = ["SIDECAR", "ImageRecord"]

# The `record` metadata value that means "the record is in the sidecar object".
SIDECAR = "@sidecar"
# S3 allows about 2 KiB of user metadata in all; records above this go to a sidecar.
_MAX_INLINE_BYTES = 1600


@dataclass(frozen=True)
class ImageRecord:
    """One stored image: what the client said about it and what the server found."""

    sha256: str
    filename: str
    content_type: str
    size_bytes: int
    width: int
    height: int
    # Pillow's format name in lowercase: png, jpeg, webp, bmp, tiff, gif.
    format: str
    dataset: str
    label: str = ""
    tags: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    create_time: datetime = field(default_factory=lambda: datetime.now(tz=UTC))
    # Random per stored upload; ties dataset-log entries to this incarnation of the image.
    generation: str = ""

    @property
    def name(self) -> str:
        """The resource name, `images/{sha256}`."""
        return f"images/{self.sha256}"

    def to_json(self) -> bytes:
        """The record as compact JSON."""
        data: dict[str, Any] = asdict(self)
        data["tags"] = list(self.tags)
        data["create_time"] = self.create_time.isoformat()
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> ImageRecord:
        """The record `to_json` wrote."""
        data = json.loads(raw)
        data["tags"] = tuple(data.get("tags", ()))
        data["create_time"] = datetime.fromisoformat(data["create_time"])
        return cls(**data)

    def inline_metadata(self) -> str | None:
        """The record as an S3-safe metadata value, or None if it is too large for one."""
        encoded = base64.urlsafe_b64encode(self.to_json()).decode().rstrip("=")
        return encoded if len(encoded) <= _MAX_INLINE_BYTES else None

    @classmethod
    def from_inline_metadata(cls, value: str) -> ImageRecord:
        """The record `inline_metadata` encoded."""
        return cls.from_json(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
