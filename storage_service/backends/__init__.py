"""Object stores behind one interface: a local folder (the embedded default) and any S3.

`ObjectStore` is deliberately small and synchronous (the `minio` SDK is blocking; async
callers wrap calls in `asyncio.to_thread`). Its contract, which the same test suite checks on
the local folder, MinIO and SeaweedFS:

- Keys are `/`-separated, non-empty segments, no `.` or `..` segment, no NUL, no leading `/`,
  at most 1,024 bytes of UTF-8; anything else raises `imagemesh.errors.InvalidArgument`.
- Writes are atomic: an object is either absent or whole. `put_stream` makes the object
  visible only when `chunks` is exhausted normally; if iterating `chunks` raises, nothing is
  left behind (the local folder discards its temp file, S3 aborts the multipart upload) and
  the exception propagates. Callers use this to validate streamed data before it commits.
- Nothing is ever held whole in memory: `put_stream` keeps at most a few parts buffered
  (multipart on S3), `get_range` yields chunks.
- A missing object raises `imagemesh.errors.NotFound` from `get_bytes`, `get_range` (at call
  time, before any chunk) and `download_file`; `stat` returns None; `delete` is idempotent.
- `get_range` opens the object when called and returns an `OpenedRange`: its `close()`
  releases the connection or file, also when no chunk was read.
- `list_keys` yields every key starting with `prefix` and greater than `start_after`, in
  lexicographic (code point) order, lazily: resuming from `start_after` is cheap.
  `list_prefixes` yields the "sub-folders" directly under a prefix, like S3's delimiter.
- Small user metadata (`metadata=`, lowercase ASCII keys, values of printable ASCII, a
  couple of KiB in all, as S3 allows) is written atomically with the object and returned by
  `stat`.
- A store that cannot be reached raises `imagemesh.errors.Unavailable`.

Keys under `models/` belong to the inference service; the storage service never touches them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from imagemesh.config import StorageBackend, StorageSettings
from storage_service.backends.keys import validate_key

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "ObjectInfo",
    "ObjectStore",
    "OpenedRange",
    "open_object_store",
    "validate_key",
]

# The size of the chunks `get_range` yields: large enough for throughput, small enough to
# forward as one gRPC message.
DEFAULT_CHUNK_BYTES = 1024 * 1024


class OpenedRange(Iterator[bytes]):
    """The chunks of an opened object range, closable before the first chunk.

    A generator that never started does not run its `finally`, so a caller that drops an
    opened range unread (a cancelled download) would hold a pooled connection or a file
    until garbage collection; `close()` releases it at once. Closing twice is harmless.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release = release

    def __iter__(self) -> OpenedRange:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        """Stops the chunks and releases what the range holds open."""
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._release()


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object."""

    key: str
    size: int
    # A token that changes when the object's bytes change (S3's ETag; on a local folder,
    # derived from the file's modification time and size). Not a content hash.
    etag: str
    last_modified: datetime
    # The media type given when the object was written, where the backend keeps one
    # (S3 does; the local folder does not and reports None).
    content_type: str | None = None
    # The user metadata written with the object (keys lowercase).
    metadata: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class ObjectStore(Protocol):
    """A flat namespace of immutable-once-written objects; see the module docstring."""

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """Writes `data` as the object `key`, replacing any previous object atomically."""
        ...

    def put_stream(
        self,
        key: str,
        chunks: Iterable[bytes],
        length: int | None,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        """Writes the concatenated `chunks` as `key`, committing only if iteration ends normally.

        `length`, when given, must equal the total; a mismatch raises ValueError and leaves
        nothing behind. `before_commit`, when given, runs once every byte has been written
        (to a temp file, or as uploaded S3 parts) and just before the object becomes visible;
        if it raises, the write is rolled back: callers validate streamed data there while
        the store's own work is already done.
        """
        ...

    def put_file(self, key: str, path: Path) -> None:
        """Writes the file at `path` as `key` (streamed, multipart on S3)."""
        ...

    def put_bytes_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Writes `data` as `key` only if no object `key` exists; True if it wrote.

        One round trip on S3 (a conditional PUT, `If-None-Match: *`), atomic against
        concurrent writers: of two racing writers exactly one gets True.
        """
        ...

    def get_bytes(self, key: str) -> bytes:
        """The whole object; NotFound if absent. For small objects only."""
        ...

    def get_range(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """The bytes `[offset, offset + length)` (to the end when `length` is None) as chunks.

        NotFound is raised by the call itself, not by the first `next()`.
        """
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Writes the object to `path` (atomically replacing it); NotFound if absent."""
        ...

    def stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or None if there is no such object."""
        ...

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """Keys starting with `prefix` and greater than `start_after`, in lexicographic order."""
        ...

    def list_prefixes(self, prefix: str) -> Iterator[str]:
        """The distinct `prefix + segment + "/"` that some key starts with, in order.

        `prefix` must be empty or end with `/`; keys directly under it are not returned.
        """
        ...

    def delete(self, key: str) -> None:
        """Removes the object; does nothing if it is absent."""
        ...

    def exists(self, key: str) -> bool:
        """True if the object exists."""
        ...


def open_object_store(settings: StorageSettings) -> ObjectStore:
    """The store `settings` describe. Cheap: S3 is contacted (and the bucket created if
    missing) on first use, so a store that is down does not prevent a service from starting.
    """
    if settings.backend is StorageBackend.S3:
        from storage_service.backends.s3 import S3ObjectStore

        return S3ObjectStore(settings.s3)
    from storage_service.backends.local import LocalObjectStore

    return LocalObjectStore(settings.local_root)
