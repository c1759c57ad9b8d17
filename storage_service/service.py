"""The storage domain: images and arrays in an `ObjectStore`, with no transport in sight.

Contracts (the gRPC layer maps the errors to status codes):

- An image is committed only once its bytes hashed to the expected SHA-256 (when one was
  given), matched the expected size, fit the size limit, and decoded as a supported image
  within the pixel limit. Until then its bytes are staged (in memory up to
  `MEMORY_UPLOAD_BYTES`, beyond that, or from the first byte when the client announced a
  larger size, in a spill file and, when the client announced the hash, in an S3
  multipart upload that is not visible until it completes); on any failure
  or cancellation the staged data is discarded, so nothing half-written is ever left.
- Uploading bytes already stored returns the stored image, flagged as a duplicate, and
  writes nothing.
- Every stored or deleted image queues an update for the search index in the durable
  outbox before the call returns (see `storage_service.outbox`).

Object layout: see `storage_service.layout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from imagemesh.config import StorageSettings
from imagemesh.errors import InvalidArgument, NotFound, ResourceExhausted
from imagemesh.names import array_key, image_sha256, validate_dataset
from imagemesh.page_tokens import PageTokenCodec
from storage_service.backends import ObjectInfo, ObjectStore
from storage_service.group_commit import GroupCommit
from storage_service.layout import (
    DERIVED_PREFIXES,
    array_object_key,
    dataset_log_key,
    dataset_log_prefix,
    image_key,
    image_link_key,
    image_links_prefix,
    record_sidecar_key,
)
from storage_service.npy import HEADER_PROBE_BYTES, NpyFacts, parse_npy, read_npy_header
from storage_service.outbox import Outbox
from storage_service.records import SIDECAR, ImageRecord
from storage_service.search_client import image_document
from storage_service.validation import UploadFields, probe_image, validate_upload_fields

__all__ = [
    "MEMORY_UPLOAD_BYTES",
    "ArrayInfo",
    "StorageDomain",
    "UploadHeader",
]

_T = TypeVar("_T")

# Uploads up to this size are staged in memory; larger ones spill to disk as they arrive.
MEMORY_UPLOAD_BYTES = 8 * 1024 * 1024
# Images smaller than this are validated on the event loop: a thread hop costs more.
_INLINE_PROBE_BYTES = 64 * 1024
_MAX_PAGE_SIZE = 1000
_DEFAULT_PAGE_SIZE = 100
_SPILL_QUEUE_CHUNKS = 4
_ARRAY_PREFIX_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._=-/"
)


@dataclass(frozen=True)
class UploadHeader:
    """What a client says about an image, before validation (mirrors UploadImageHeader)."""

    filename: str
    content_type: str = ""
    dataset: str = ""
    label: str = ""
    tags: Sequence[str] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)
    expected_sha256: str = ""
    expected_size_bytes: int = 0

    def validate(self) -> UploadFields:
        """The validated fields; raises `InvalidArgument`."""
        return validate_upload_fields(
            filename=self.filename,
            dataset=self.dataset,
            label=self.label,
            tags=list(self.tags),
            attributes=dict(self.attributes),
            content_type=self.content_type,
            expected_sha256=self.expected_sha256,
            expected_size_bytes=self.expected_size_bytes,
        )


@dataclass(frozen=True)
class ArrayInfo:
    """A stored array's metadata."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    size_bytes: int
    update_time: datetime


class _Aborted(Exception):
    """Internal: a staged write was abandoned; its store write must roll back."""


class StorageDomain:
    """Images and arrays over one object store; every public method is a coroutine."""

    def __init__(
        self,
        settings: StorageSettings,
        store: ObjectStore,
        outbox: Outbox,
        *,
        state_dir: Path,
        on_outbox_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.outbox = outbox
        self._on_outbox_change = on_outbox_change
        self._tokens = PageTokenCodec(settings.page_token_secret)
        self._spill_dir = state_dir / "spill"
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        for stray in self._spill_dir.iterdir():  # left by a crash mid-upload
            with contextlib.suppress(OSError):
                stray.unlink()
        # The default executor has cpu+4 threads; bulk uploads keep more store calls in
        # flight than that, and those calls wait on the network, not the CPU.
        self._executor = ThreadPoolExecutor(
            max_workers=settings.bulk_concurrency + 8, thread_name_prefix="storage-io"
        )
        self._log_writes: GroupCommit[tuple[str, str, str]] = GroupCommit(self._write_logs)
        self._outbox_writes: GroupCommit[tuple[str, str, bytes | None]] = GroupCommit(
            self._write_outbox
        )

    def close(self) -> None:
        """Releases the thread pool."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- batched side writes ---------------------------------------------------------------

    async def _write_logs(self, entries: Sequence[tuple[str, str, str]]) -> None:
        by_dataset: dict[str, list[list[str]]] = {}
        for dataset, sha, generation in entries:
            by_dataset.setdefault(dataset, []).append([sha, generation])
        await asyncio.gather(
            *(
                self._run(
                    self.store.put_bytes,
                    dataset_log_key(dataset),
                    json.dumps(items, separators=(",", ":")).encode(),
                    "application/json",
                )
                for dataset, items in by_dataset.items()
            )
        )

    async def _write_outbox(self, ops: Sequence[tuple[str, str, bytes | None]]) -> None:
        await self._run(self.outbox.put_many, ops)
        self._on_outbox_change()

    async def _queue_index(self, record: ImageRecord) -> None:
        document = image_document(record).SerializeToString()
        await self._outbox_writes.add((record.name, "index", document))

    # -- records ---------------------------------------------------------------------------

    def _record_from_info(self, sha: str, info: ObjectInfo | None) -> ImageRecord | None:
        if info is None:
            return None
        value = info.metadata.get("record")
        if not value:
            return None  # not written by this service
        if value == SIDECAR:
            try:
                return ImageRecord.from_json(self.store.get_bytes(record_sidecar_key(sha)))
            except NotFound:
                return None
        return ImageRecord.from_inline_metadata(value)

    def _read_record(self, sha: str) -> ImageRecord | None:
        return self._record_from_info(sha, self.store.stat(image_key(sha)))

    async def get_image(self, name: str) -> ImageRecord:
        """The image's record; `NotFound` if there is none."""
        sha = image_sha256(name)
        record = await self._run(self._read_record, sha)
        if record is None:
            raise NotFound(f"no image {name}", reason="IMAGE_NOT_FOUND")
        return record

    def _new_record(self, fields: UploadFields, sha: str, size: int, facts: Any) -> ImageRecord:
        return ImageRecord(
            sha256=sha,
            filename=fields.filename,
            content_type=facts.content_type,
            size_bytes=size,
            width=facts.width,
            height=facts.height,
            format=facts.format,
            dataset=fields.dataset,
            label=fields.label,
            tags=fields.tags,
            attributes=fields.attributes,
            create_time=datetime.now(tz=UTC),
            generation=os.urandom(6).hex(),
        )

    def _metadata_for(self, record: ImageRecord) -> tuple[dict[str, str], bool]:
        inline = record.inline_metadata()
        if inline is None:
            return {"record": SIDECAR}, True
        return {"record": inline}, False

    # -- small images (bulk, and uploads that fit in memory) --------------------------------

    def _check_size(self, fields: UploadFields, total: int) -> None:
        if total > self.settings.max_object_bytes:
            raise ResourceExhausted(
                f"the image is larger than this server's maximum of "
                f"{self.settings.max_object_bytes:,} bytes",
                reason="OBJECT_TOO_LARGE",
                retry_after_s=None,
            )
        if fields.expected_size_bytes and total > fields.expected_size_bytes:
            raise InvalidArgument(
                f"received more than the {fields.expected_size_bytes:,} bytes announced in "
                "expected_size_bytes",
                reason="SIZE_MISMATCH",
                field="header.expected_size_bytes",
            )

    @staticmethod
    def _check_end(fields: UploadFields, total: int, sha: str) -> None:
        if total == 0:
            raise InvalidArgument(
                "the upload has a header but no image bytes; send the image in chunks after "
                "the header",
                reason="EMPTY_IMAGE",
                field="chunk",
            )
        if fields.expected_size_bytes and total != fields.expected_size_bytes:
            raise InvalidArgument(
                f"received {total:,} bytes but expected_size_bytes is "
                f"{fields.expected_size_bytes:,}; the upload was incomplete or the size wrong",
                reason="SIZE_MISMATCH",
                field="header.expected_size_bytes",
            )
        if fields.expected_sha256 and sha != fields.expected_sha256:
            raise InvalidArgument(
                f"the received bytes hash to {sha}, not to expected_sha256 "
                f"{fields.expected_sha256}; the data was corrupted in transit or the hash is "
                "wrong; nothing was stored",
                reason="CHECKSUM_MISMATCH",
                field="header.expected_sha256",
            )

    async def store_image_bytes(
        self, header: UploadHeader, content: bytes
    ) -> tuple[ImageRecord, bool]:
        """Stores one image given whole; returns (record, duplicate)."""
        fields = header.validate()
        self._check_size(fields, len(content))
        sha = hashlib.sha256(content).hexdigest()
        self._check_end(fields, len(content), sha)
        return await self._commit_small(fields, content, sha)

    async def _commit_small(
        self, fields: UploadFields, content: bytes, sha: str
    ) -> tuple[ImageRecord, bool]:
        max_pixels = self.settings.max_image_pixels
        if len(content) <= _INLINE_PROBE_BYTES:
            facts = probe_image(
                content, max_pixels=max_pixels, declared_content_type=fields.content_type
            )
        else:
            facts = await self._run(
                lambda: probe_image(
                    content, max_pixels=max_pixels, declared_content_type=fields.content_type
                )
            )
        record = self._new_record(fields, sha, len(content), facts)
        metadata, sidecar = self._metadata_for(record)
        if sidecar:
            # A sidecar must not overwrite a stored image's record: look before writing.
            existing = await self._run(self._read_record, sha)
            if existing is not None:
                return existing, True
        await self._log_writes.add((record.dataset, sha, record.generation))
        if sidecar:
            await self._run(
                self.store.put_bytes, record_sidecar_key(sha), record.to_json(), "application/json"
            )
        # One conditional write both stores the image and detects a duplicate: a HEAD per
        # image would cost a round trip that bulk uploads of new images never need. A
        # duplicate leaves only a log entry that no longer matches (ignored, compacted away).
        written = await self._run(
            lambda: self.store.put_bytes_if_absent(
                image_key(sha), content, record.content_type, metadata=metadata
            )
        )
        if not written:
            existing = await self._run(self._read_record, sha)
            if existing is not None:
                return existing, True
            # Deleted between the write and the read: store it after all.
            await self._run(
                lambda: self.store.put_bytes(
                    image_key(sha), content, record.content_type, metadata=metadata
                )
            )
        await self._queue_index(record)
        return record, False

    # -- streamed uploads ------------------------------------------------------------------

    async def upload(
        self, header: UploadHeader, chunks: AsyncIterator[bytes]
    ) -> tuple[ImageRecord, bool]:
        """Stores an image that arrives in chunks; returns (record, duplicate).

        Errors raised by `chunks` (a malformed stream, a cancelled client) abort the upload
        like any validation failure: nothing is left behind.
        """
        fields = header.validate()
        if fields.expected_size_bytes:
            self._check_size(fields, fields.expected_size_bytes)
        pieces: list[bytes] = []
        buffered = 0
        total = 0
        spill: _Spill | None = None
        try:
            if fields.expected_size_bytes > MEMORY_UPLOAD_BYTES:
                # Announced as large: stage from the first byte, with no in-memory copy.
                spill = await self._start_spill(fields)
            async for chunk in chunks:
                total += len(chunk)
                self._check_size(fields, total)
                if spill is None:
                    pieces.append(chunk)
                    buffered += len(chunk)
                    if buffered > MEMORY_UPLOAD_BYTES:
                        spill = await self._start_spill(fields)
                        for piece in pieces:
                            await spill.feed(piece)
                        pieces.clear()
                else:
                    await spill.feed(chunk)
            if spill is None:
                content = b"".join(pieces)
                sha = hashlib.sha256(content).hexdigest()
                self._check_end(fields, total, sha)
                return await self._commit_small(fields, content, sha)
            sha = await spill.end_of_data()
            self._check_end(fields, total, sha)
            return await self._commit_spill(fields, spill, sha, total)
        except BaseException:
            if spill is not None:
                await spill.abort()
            raise
        finally:
            if spill is not None:
                spill.cleanup()

    async def _start_spill(self, fields: UploadFields) -> _Spill:
        path = self._spill_dir / uuid.uuid4().hex
        spill = _Spill(path)
        try:
            if fields.expected_sha256:
                sha = fields.expected_sha256
                existing = await self._run(self._read_record, sha)
                if existing is not None:
                    spill.duplicate_of = existing
                    spill.keep_file = False
                else:
                    # The client told us the hash, so the bytes can stream to their final
                    # key while they arrive; S3 shows them only if the multipart upload
                    # completes, which happens only after every check passed.
                    spill.start_store_write(
                        self, image_key(sha), {"record": SIDECAR}, fields.content_type
                    )
        except BaseException:
            # The caller never gets this spill to clean up: its file goes now.
            await spill.abort()
            spill.cleanup()
            raise
        return spill

    async def _commit_spill(
        self, fields: UploadFields, spill: _Spill, sha: str, total: int
    ) -> tuple[ImageRecord, bool]:
        if spill.duplicate_of is not None:
            await spill.abort()
            return spill.duplicate_of, True
        if not spill.streaming:
            existing = await self._run(self._read_record, sha)
            if existing is not None:
                return existing, True
        # When streaming, the store sends its last part while the image is validated.
        max_pixels = self.settings.max_image_pixels
        facts = await self._run(
            lambda: probe_image(
                spill.path, max_pixels=max_pixels, declared_content_type=fields.content_type
            )
        )
        record = self._new_record(fields, sha, total, facts)
        if spill.streaming:
            # The sidecar before the commit: the bytes must never be visible without their
            # record. The log entry is written meanwhile (a log entry without an image is
            # skipped by listings), so the two round trips overlap.
            results = await asyncio.gather(
                self._log_writes.add((record.dataset, sha, record.generation)),
                self._run(
                    self.store.put_bytes,
                    record_sidecar_key(sha),
                    record.to_json(),
                    "application/json",
                ),
                return_exceptions=True,
            )
            # Both finish before any error surfaces, so a failed upload's abort never races
            # a sidecar write still in flight.
            # (A sidecar written before the log failed stays: another upload of the same
            # bytes may be committing with it, and an image's absence makes it inert.)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            await spill.commit()
        else:
            await self._log_writes.add((record.dataset, sha, record.generation))
            metadata, sidecar = self._metadata_for(record)
            if sidecar:
                await self._run(
                    self.store.put_bytes,
                    record_sidecar_key(sha),
                    record.to_json(),
                    "application/json",
                )
            await self._run(
                lambda: self.store.put_stream(
                    image_key(sha),
                    _file_chunks(spill.path),
                    total,
                    record.content_type,
                    metadata=metadata,
                )
            )
        await self._queue_index(record)
        return record, False

    # -- downloads, listing ----------------------------------------------------------------

    async def download(
        self, name: str, offset: int, length: int
    ) -> tuple[ImageRecord, AsyncIterator[bytes]]:
        """The image's record and an iterator over `[offset, offset+length)` of its bytes."""
        if offset < 0:
            raise InvalidArgument(
                f"offset must not be negative, got {offset}", reason="INVALID_RANGE", field="offset"
            )
        if length < 0:
            raise InvalidArgument(
                f"length must not be negative, got {length}", reason="INVALID_RANGE", field="length"
            )
        if offset == 0:
            # Nothing to check against the record first: its read (one or two round trips)
            # and the opening of the bytes overlap instead of adding up.
            key = image_key(image_sha256(name))
            opening = asyncio.ensure_future(self._run(self.store.get_range, key, 0, length or None))
            try:
                found, opened = await asyncio.gather(
                    self.get_image(name), asyncio.shield(opening), return_exceptions=True
                )
            except BaseException:
                # Cancelled: the store's thread still opens the bytes; release them then.
                opening.add_done_callback(_close_opened)
                raise
            if isinstance(found, BaseException) or isinstance(opened, BaseException):
                if not isinstance(opened, BaseException):
                    close = getattr(opened, "close", None)
                    if close is not None:
                        await self._run(close)
                if isinstance(found, BaseException):
                    raise found
                assert isinstance(opened, BaseException)
                if isinstance(opened, NotFound):  # deleted between the two reads
                    raise NotFound(f"no image {name}", reason="IMAGE_NOT_FOUND") from opened
                raise opened
            return found, self._prefetch(opened)
        record = await self.get_image(name)
        if offset >= record.size_bytes:
            raise InvalidArgument(
                f"offset {offset} is past the end of the image ({record.size_bytes} bytes)",
                reason="INVALID_RANGE",
                field="offset",
            )
        chunks = await self._run(
            self.store.get_range, image_key(record.sha256), offset, length or None
        )
        return record, self._prefetch(chunks)

    async def _prefetch(self, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
        # The next chunk is read from the store while the current one is sent.
        pending = self._run(next, chunks, None)
        try:
            while True:
                chunk = await pending
                if chunk is None:
                    return
                pending = self._run(next, chunks, None)
                yield chunk
        finally:
            with contextlib.suppress(BaseException):
                await pending
            close = getattr(chunks, "close", None)
            if close is not None:
                await self._run(close)

    async def list_images(
        self, dataset: str, page_size: int, page_token: str
    ) -> tuple[list[ImageRecord], str]:
        """A page of the dataset's images in the order they were added, and the next token."""
        dataset = validate_dataset(dataset)
        size = _page_size(page_size)
        query = f"images:{dataset}"
        position = self._tokens.decode(page_token, query=query) if page_token else {}
        segment = str(position.get("s", ""))
        index = int(position.get("i", 0))
        return await self._run(self._list_page, dataset, size, segment, index, query)

    def _list_page(
        self, dataset: str, size: int, segment: str, index: int, query: str
    ) -> tuple[list[ImageRecord], str]:
        prefix = dataset_log_prefix(dataset)
        start_after = segment[:-1] if segment else ""  # just before `segment`
        found: list[ImageRecord] = []
        seen: set[str] = set()
        for key in self.store.list_keys(prefix, start_after):
            try:
                entries = json.loads(self.store.get_bytes(key))
            except NotFound:
                continue
            first = index if key == segment else 0
            candidates = [(i, sha, gen) for i, (sha, gen) in enumerate(entries) if i >= first]
            for start in range(0, len(candidates), size):
                batch = candidates[start : start + size]
                records = list(
                    self._executor.map(lambda c: self._read_record(c[1]), batch)
                    if len(batch) > 1
                    else [self._read_record(batch[0][1])]
                )
                for (i, sha, gen), record in zip(batch, records, strict=True):
                    if (
                        record is None
                        or record.dataset != dataset
                        or record.generation != gen
                        or sha in seen
                    ):
                        continue
                    seen.add(sha)
                    found.append(record)
                    if len(found) == size:
                        token = self._tokens.encode({"s": key, "i": i + 1}, query=query)
                        return found, token
        return found, ""

    # -- deletion --------------------------------------------------------------------------

    async def delete_image(self, name: str) -> int:
        """Deletes the image, its arrays and (through the outbox) its search document.

        Returns how many arrays were deleted with it.
        """
        record = await self.get_image(name)
        count = await self._run(self._delete_image_objects, record)
        await self._outbox_writes.add((record.name, "delete", None))
        return count

    def _delete_image_objects(self, record: ImageRecord) -> int:
        sha = record.sha256
        deleted: set[str] = set()
        for link in list(self.store.list_keys(image_links_prefix(sha))):
            key = array_object_key(link[len(image_links_prefix(sha)) :])
            if self.store.exists(key):
                self.store.delete(key)
                deleted.add(key)
            self.store.delete(link)
        for prefix in DERIVED_PREFIXES:
            for model in list(self.store.list_prefixes(prefix)):
                for version in list(self.store.list_prefixes(model)):
                    key = f"{version}{sha}.npy"
                    if key not in deleted and self.store.exists(key):
                        self.store.delete(key)
                        deleted.add(key)
        self.store.delete(image_key(sha))
        self.store.delete(record_sidecar_key(sha))
        return len(deleted)

    # -- arrays ----------------------------------------------------------------------------

    async def put_array(
        self,
        name: str,
        content: bytes,
        expected_dtype: str,
        expected_shape: Sequence[int],
        image: str,
    ) -> ArrayInfo:
        """Validates and stores a `.npy` array, replacing any array of that name."""
        key = array_key(name)
        if not content:
            raise InvalidArgument(
                "npy_content is required", reason="INVALID_NPY", field="npy_content"
            )
        if len(content) > self.settings.max_object_bytes:
            raise ResourceExhausted(
                f"the array is larger than this server's maximum of "
                f"{self.settings.max_object_bytes:,} bytes",
                reason="OBJECT_TOO_LARGE",
                retry_after_s=None,
            )
        sha = image_sha256(image, field="image") if image else ""
        facts = await self._run(
            lambda: parse_npy(content, expected_dtype=expected_dtype, expected_shape=expected_shape)
        )
        if sha and not await self._run(self.store.exists, image_key(sha)):
            raise InvalidArgument(
                f"image {image} does not exist; store the image before arrays derived from it",
                reason="IMAGE_NOT_FOUND",
                field="image",
            )
        metadata = {"dtype": facts.dtype, "shape": ",".join(str(n) for n in facts.shape)}
        if sha:
            metadata["image"] = sha
            # The link first: an array must never exist unknown to its image's deletion.
            await self._run(self.store.put_bytes, image_link_key(sha, key), b"")
        object_key = array_object_key(key)
        await self._run(
            lambda: self.store.put_bytes(
                object_key, content, "application/x-npy", metadata=metadata
            )
        )
        return ArrayInfo(
            name=name,
            dtype=facts.dtype,
            shape=facts.shape,
            size_bytes=len(content),
            update_time=datetime.now(tz=UTC),
        )

    def _array_info(self, name: str, info: ObjectInfo, content: bytes | None = None) -> ArrayInfo:
        shape_text = info.metadata.get("shape")
        dtype = info.metadata.get("dtype")
        if dtype is None or shape_text is None:
            # Written without metadata (batch jobs, other writers): the `.npy` header says.
            facts = self._npy_facts(info, content)
            dtype, shape = facts.dtype, facts.shape
        else:
            shape = tuple(int(n) for n in shape_text.split(",") if n)
        return ArrayInfo(
            name=name,
            dtype=dtype,
            shape=shape,
            size_bytes=info.size,
            update_time=info.last_modified,
        )

    def _npy_facts(self, info: ObjectInfo, content: bytes | None) -> NpyFacts:
        """The dtype and shape of a stored array: from `content` when the caller already
        holds the bytes, else from the object's first few KiB (never its whole data)."""
        if content is None:
            prefix = b"".join(self.store.get_range(info.key, 0, HEADER_PROBE_BYTES))
            facts = read_npy_header(prefix)
            if facts is not None:
                return facts
            content = self.store.get_bytes(info.key)
        return read_npy_header(content) or parse_npy(content)

    async def get_array(self, name: str) -> tuple[ArrayInfo, bytes]:
        """The array's metadata and bytes; `NotFound` if there is none."""
        key = array_object_key(array_key(name))

        def read() -> tuple[ArrayInfo, bytes]:
            info = self.store.stat(key)
            if info is None:
                raise NotFound(f"no array {name}", reason="ARRAY_NOT_FOUND")
            try:
                content = self.store.get_bytes(key)
            except NotFound:  # deleted between the two calls
                raise NotFound(f"no array {name}", reason="ARRAY_NOT_FOUND") from None
            return self._array_info(name, info, content), content

        return await self._run(read)

    async def list_arrays(
        self, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[ArrayInfo], str]:
        """A page of arrays whose name starts with `prefix`, in name order."""
        if (
            not prefix.startswith("arrays/")
            or len(prefix.encode()) > 1024
            or not set(prefix) <= _ARRAY_PREFIX_CHARS
            or "//" in prefix
            or any(s in {".", ".."} for s in prefix.split("/"))
        ):
            raise InvalidArgument(
                "prefix must start with 'arrays/' and use only [A-Za-z0-9._=-] segments "
                f"separated by single '/', with no '.' or '..' segment; got {prefix[:100]!r}",
                reason="INVALID_PREFIX",
                field="prefix",
            )
        size = _page_size(page_size)
        query = f"arrays:{prefix}"
        after = str(self._tokens.decode(page_token, query=query).get("k", "")) if page_token else ""

        def page() -> tuple[list[ArrayInfo], str]:
            keys: list[str] = []
            for key in self.store.list_keys(prefix, after):
                if not key.endswith(".npy"):
                    continue
                keys.append(key)
                if len(keys) > size:
                    break
            more = len(keys) > size
            keys = keys[:size]
            infos = list(self._executor.map(self.store.stat, keys)) if keys else []
            arrays = [
                self._array_info(key, info)
                for key, info in zip(keys, infos, strict=True)
                if info is not None
            ]
            token = self._tokens.encode({"k": keys[-1]}, query=query) if more else ""
            return arrays, token

        return await self._run(page)

    async def delete_array(self, name: str) -> None:
        """Deletes the array; `NotFound` if there is none."""
        key = array_key(name)
        object_key = array_object_key(key)

        def delete() -> None:
            info = self.store.stat(object_key)
            if info is None:
                raise NotFound(f"no array {name}", reason="ARRAY_NOT_FOUND")
            self.store.delete(object_key)
            image = info.metadata.get("image")
            if image:
                self.store.delete(image_link_key(image, key))

        await self._run(delete)


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if opening.cancelled() or opening.exception() is not None:
        return
    close = getattr(opening.result(), "close", None)
    if close is not None:
        close()


def _page_size(page_size: int) -> int:
    if page_size < 0 or page_size > _MAX_PAGE_SIZE:
        raise InvalidArgument(
            f"page_size must be 0 (default {_DEFAULT_PAGE_SIZE}) to {_MAX_PAGE_SIZE}, "
            f"got {page_size}",
            reason="INVALID_PAGE_SIZE",
            field="page_size",
        )
    return page_size or _DEFAULT_PAGE_SIZE


def _file_chunks(path: Path, chunk_bytes: int = 1024 * 1024) -> Iterator[bytes]:
    with path.open("rb") as source:
        while chunk := source.read(chunk_bytes):
            yield chunk


_END = object()


class _Spill:
    """A large upload being staged: its SHA-256, a spill file for validation and,
    optionally, a store write of the same bytes that commits only when told to.

    When the store write runs, its thread also hashes each chunk and writes it to the spill
    file, so the event loop only hands chunks over and goes back to receiving.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._hasher = hashlib.sha256()
        self.keep_file = True
        self.duplicate_of: ImageRecord | None = None
        self.streaming = False
        self._queue: queue.Queue[object] = queue.Queue(maxsize=_SPILL_QUEUE_CHUNKS)
        self._commit = threading.Event()
        self._abort = threading.Event()
        self._write: asyncio.Future[None] | None = None
        self._staged: asyncio.Future[None] | None = None
        self._domain: StorageDomain | None = None

    def start_store_write(
        self, domain: StorageDomain, key: str, metadata: dict[str, str], content_type: str
    ) -> None:
        self.streaming = True
        self._domain = domain
        loop = asyncio.get_running_loop()
        staged: asyncio.Future[None] = loop.create_future()
        self._staged = staged

        def mark_staged() -> None:
            if not staged.done():
                staged.set_result(None)

        def chunks() -> Iterator[bytes]:
            yield from self._chunks()
            # Every byte is hashed and in the spill file: validation may start.
            loop.call_soon_threadsafe(mark_staged)

        self._write = loop.run_in_executor(
            domain._executor,
            lambda: domain.store.put_stream(
                key,
                chunks(),
                None,
                content_type or "application/octet-stream",
                metadata=metadata,
                before_commit=self._await_commit,
            ),
        )
        # An abandoned write ends with _Aborted, which nobody else may await.
        self._write.add_done_callback(lambda f: f.cancelled() or f.exception())

    def _chunks(self) -> Iterator[bytes]:
        while True:
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                if self._abort.is_set():
                    raise _Aborted("upload abandoned") from None
                continue
            if item is _END:
                self._file.close()
                return
            assert isinstance(item, bytes)
            self._hasher.update(item)
            self._file.write(item)
            yield item

    def _await_commit(self) -> None:
        # Runs in the store's thread once every byte is written: the last part uploads
        # while the image is validated, and the object appears only if it passed.
        while not self._commit.wait(0.2):
            if self._abort.is_set():
                raise _Aborted("upload abandoned")

    def _offer(self, item: object) -> None:
        # Runs in a thread: waits for room, unless the store write has died.
        while not self._abort.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if self._write is not None and self._write.done():
                    return

    async def feed(self, chunk: bytes) -> None:
        if not self.streaming or self._write is None:
            self._hasher.update(chunk)
            if self.keep_file:
                self._file.write(chunk)
            return
        if self._write.done():
            await self._write  # raises the store's error
            raise _Aborted("the store write ended early")
        try:
            self._queue.put_nowait(chunk)
        except queue.Full:
            assert self._domain is not None
            await self._domain._run(self._offer, chunk)

    async def end_of_data(self) -> str:
        """Marks the end of the bytes; returns their SHA-256 once all are staged."""
        if self.streaming:
            assert self._domain is not None
            assert self._write is not None
            assert self._staged is not None
            await self._domain._run(self._offer, _END)
            # The store write may die before it staged everything; its error says why.
            await asyncio.wait([self._staged, self._write], return_when=asyncio.FIRST_COMPLETED)
            if not self._staged.done():
                await self._write
                raise _Aborted("the store write ended early")
        self.close_file()
        return self._hasher.hexdigest()

    def close_file(self) -> None:
        if not self._file.closed:
            self._file.close()

    async def commit(self) -> None:
        assert self._write is not None
        self._commit.set()
        await self._write

    async def abort(self) -> None:
        self._abort.set()
        if self._staged is not None and not self._staged.done():
            self._staged.cancel()
        if self._write is not None:
            # Wait for the store to roll back, so that nothing is visible once we answer;
            # shielded, since this also runs when the call was cancelled.
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._write)

    def cleanup(self) -> None:
        self.close_file()
        with contextlib.suppress(OSError):
            self.path.unlink()
