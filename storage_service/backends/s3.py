"""An `ObjectStore` on any S3 server (MinIO, SeaweedFS, AWS S3, ...) through the `minio` SDK.

Writes of unknown or large size are multipart uploads of `part_size` parts with at most
three in flight, so memory stays bounded whatever the object's size; S3 shows an object
only once its upload completes, and an aborted upload leaves nothing. The bucket is created
on first use if it is missing. Connection failures and 5xx answers become
`imagemesh.errors.Unavailable`; S3's "no such key" becomes `NotFound`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.datatypes import Part
from minio.error import InvalidResponseError, S3Error, ServerError
from minio.helpers import genheaders

from imagemesh.config import S3Settings
from imagemesh.errors import FailedPrecondition, ImageMeshError, NotFound, Unavailable
from storage_service.backends import DEFAULT_CHUNK_BYTES, ObjectInfo, OpenedRange
from storage_service.backends.keys import validate_key

__all__ = ["DEFAULT_PART_BYTES", "S3ObjectStore"]

# S3's minimum part is 5 MiB; 8 MiB keeps a streamed write under ~40 MiB of buffers
# (three parts in flight plus the one being filled) while amortising request overhead.
DEFAULT_PART_BYTES = 8 * 1024 * 1024

_MISSING_CODES = {"NoSuchKey", "NoSuchObject", "ResourceNotFound", "NotFound"}
# 4xx answers that retrying cannot fix: the deployment is misconfigured.
_CONFIG_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AllAccessDisabled",
    "InvalidBucketName",
}

_T = TypeVar("_T")
_META_PREFIX = "x-amz-meta-"


_PAYLOAD_HASH = "x-amz-content-sha256"
_UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


class _Minio(Minio):
    """The SDK's client, able to send a part without hashing it for the signature.

    Over plain HTTP the SDK signs a SHA-256 of every request body, which for a streamed
    upload is a second full hash of bytes the service has just hashed itself (a fifth of
    the upload path's CPU). A request whose headers ask for `UNSIGNED-PAYLOAD` is signed
    without it, as the SDK itself does over HTTPS. `S3ObjectStore` asks for that only where
    nothing on the way can alter the bytes: a loopback endpoint (a store on the same host).
    Over plain HTTP to another host the payload stays signed, so a part altered on the way
    is refused by the server.
    """

    def _build_headers(
        self,
        host: str,
        headers: Any = None,
        body: bytes | None = None,
        creds: Any = None,
    ) -> tuple[Any, datetime]:
        if not headers or headers.get(_PAYLOAD_HASH) != _UNSIGNED_PAYLOAD or not body:
            return super()._build_headers(host, headers, body, creds)
        built, date = super()._build_headers(host, headers, None, creds)
        built["Content-Length"] = str(len(body))
        built[_PAYLOAD_HASH] = _UNSIGNED_PAYLOAD
        return built, date


def _nothing() -> None:
    return None


def _release(response: Any) -> None:
    response.close()
    response.release_conn()


def _is_loopback(endpoint: str) -> bool:
    host = urlsplit(f"//{endpoint}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str | list[str] | tuple[str]]:
    # The SDK adds the x-amz-meta- prefix to names that lack it.
    return {name.lower(): value for name, value in (metadata or {}).items()}


class S3ObjectStore:
    """Objects in one S3 bucket; see the module docstring."""

    def __init__(
        self,
        settings: S3Settings,
        *,
        part_size: int = DEFAULT_PART_BYTES,
        max_connections: int = 32,
    ) -> None:
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint
        self._part_size = part_size
        # The SDK's default pool holds 10 connections and retries 5 times with backoff; the
        # bulk path runs more concurrent requests, and a dead server should fail in seconds.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=60.0),
            maxsize=max_connections,
            retries=urllib3.Retry(
                total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        self._client = _Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
        # See `_Minio`: skip the per-part payload hash on a plain-HTTP loopback connection.
        # Over TLS the SDK already signs parts as UNSIGNED-PAYLOAD (and adds the Content-MD5
        # that some buckets, e.g. with Object Lock, require), so it is left to do so.
        self._part_headers = (
            {_PAYLOAD_HASH: _UNSIGNED_PAYLOAD}
            if not settings.secure and _is_loopback(settings.endpoint)
            else {}
        )
        self._bucket_ready = False
        # MinIO, SeaweedFS and AWS honour If-None-Match on PUT; turned off if a server says
        # it does not implement it.
        self._conditional_puts = True
        self._bucket_lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------

    def _raise(self, exc: Exception, key: str) -> NoReturn:
        if isinstance(exc, ImageMeshError):
            raise exc
        if isinstance(exc, S3Error):
            if exc.code in _MISSING_CODES:
                raise NotFound(f"no object {key!r}") from exc
            if exc.code in _CONFIG_CODES:
                raise FailedPrecondition(
                    f"the S3 server at {self.endpoint} refused bucket {self.bucket!r} "
                    f"({exc.code}): check the storage credentials and bucket settings",
                    reason="S3_ACCESS_REFUSED",
                ) from exc
            raise Unavailable(
                f"the S3 server at {self.endpoint} failed on {key!r}: {exc.code} {exc.message}",
                reason="S3_ERROR",
            ) from exc
        raise Unavailable(
            f"cannot reach the S3 server at {self.endpoint}: {type(exc).__name__}: {exc}",
            reason="OBJECT_STORE_UNAVAILABLE",
        ) from exc

    def _call(self, key: str, fn: Callable[[], _T]) -> _T:
        self._ensure_bucket()
        try:
            return fn()
        except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, key)
        except OSError as exc:
            self._raise(exc, key)

    def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                if not self._client.bucket_exists(self.bucket):
                    try:
                        self._client.make_bucket(self.bucket)
                    except S3Error as exc:  # another process created it first
                        if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                            raise
            except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as e:
                self._raise(e, self.bucket)
            except OSError as exc:
                self._raise(exc, self.bucket)
            self._bucket_ready = True

    # -- writes --------------------------------------------------------------------------

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        """See `ObjectStore.put_bytes`."""
        validate_key(key)
        self._call(
            key,
            lambda: self._client.put_object(
                self.bucket,
                key,
                BytesIO(data),
                len(data),
                content_type=content_type,
                metadata=_user_metadata(metadata),
            ),
        )

    def put_bytes_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """See `ObjectStore.put_bytes_if_absent`."""
        validate_key(key)
        if not self._conditional_puts:
            if self.stat(key) is not None:
                return False
            self.put_bytes(key, data, content_type, metadata=metadata)
            return True
        headers = genheaders(_user_metadata(metadata), None, None, None, False)
        headers["Content-Type"] = content_type or "application/octet-stream"
        headers["If-None-Match"] = "*"

        def put() -> bool:
            try:
                self._client._put_object(self.bucket, key, data, headers)
            except S3Error as exc:
                if exc.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                    return False
                if exc.code == "NotImplemented":  # a server without conditional writes
                    self._conditional_puts = False
                    return self.put_bytes_if_absent(key, data, content_type, metadata=metadata)
                raise
            return True

        return self._call(key, put)

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
        """See `ObjectStore.put_stream`.

        Parts are uploaded as they fill (three in flight), the last one as soon as `chunks`
        ends; `before_commit` then runs, and only if it returns is the upload completed.
        Objects smaller than one part are sent in one PUT after `before_commit`.
        """
        validate_key(key)
        self._ensure_bucket()
        headers = genheaders(_user_metadata(metadata), None, None, None, False)
        headers["Content-Type"] = content_type or "application/octet-stream"
        upload_id: str | None = None
        uploads: list[Future[str]] = []
        pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="s3-part")
        # At most this many parts are in flight; the reader waits for room.
        room = threading.BoundedSemaphore(3)
        pending: list[bytes] = []  # chunks of the part being filled
        pending_bytes = 0
        total = 0

        def send(part: bytes, number: int) -> str:
            try:
                assert upload_id is not None
                return str(
                    self._client._upload_part(
                        self.bucket,
                        key,
                        part,
                        dict(self._part_headers),
                        upload_id,
                        number,
                    )
                )
            finally:
                room.release()

        def flush(part: bytes) -> None:
            nonlocal upload_id
            if upload_id is None:
                upload_id = self._client._create_multipart_upload(self.bucket, key, dict(headers))
            room.acquire()
            uploads.append(pool.submit(send, part, len(uploads) + 1))

        try:
            try:
                for chunk in chunks:
                    total += len(chunk)
                    pending.append(chunk)
                    pending_bytes += len(chunk)
                    if pending_bytes >= self._part_size:
                        # Joined once into the part; the rest (if a chunk straddled the
                        # boundary) starts the next one.
                        joined = b"".join(pending)
                        pending.clear()
                        start = 0
                        while len(joined) - start >= self._part_size:
                            flush(joined[start : start + self._part_size])
                            start += self._part_size
                        if start < len(joined):
                            pending.append(joined[start:])
                        pending_bytes = len(joined) - start
                        del joined
                if length is not None and total != length:
                    raise ValueError(
                        f"put_stream for {key!r}: expected {length} bytes, got {total}"
                    )
                rest = b"".join(pending)
                pending.clear()
                if upload_id is not None and rest:
                    flush(rest)
                    rest = b""
                etags = [f.result() for f in uploads]
                if before_commit is not None:
                    before_commit()
                if upload_id is None:
                    self._client._put_object(self.bucket, key, rest, headers)
                else:
                    self._client._complete_multipart_upload(
                        self.bucket,
                        key,
                        upload_id,
                        [Part(number, etag) for number, etag in enumerate(etags, start=1)],
                    )
            except BaseException:
                for future in uploads:
                    future.cancel()
                if upload_id is not None:
                    pool.shutdown(wait=True)
                    with contextlib.suppress(Exception):
                        self._client._abort_multipart_upload(self.bucket, key, upload_id)
                raise
            finally:
                pool.shutdown(wait=False)
        except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, key)
        except OSError as exc:
            self._raise(exc, key)

    def put_file(self, key: str, path: Path) -> None:
        """See `ObjectStore.put_file`."""
        validate_key(key)
        size = Path(path).stat().st_size
        with Path(path).open("rb") as source:
            self._call(
                key,
                lambda: self._client.put_object(
                    self.bucket,
                    key,
                    source,
                    size,
                    part_size=max(self._part_size, -(-size // 10_000)),
                ),
            )

    # -- reads ---------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        """See `ObjectStore.get_bytes`."""
        return b"".join(self.get_range(key))

    def get_range(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """See `ObjectStore.get_range`."""
        validate_key(key)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        if length == 0:
            # The SDK reads length 0 as "to the end"; an empty range still needs the object.
            if self.stat(key) is None:
                raise NotFound(f"no object {key!r}")
            return OpenedRange(iter(()), _nothing)
        try:
            response = self._client_get(key, offset, length or 0)
        except _RangePastEnd:
            # S3 refuses a range that starts at or past the end; the contract is "no bytes".
            if self.stat(key) is None:
                raise NotFound(f"no object {key!r}") from None
            return OpenedRange(iter(()), _nothing)
        return OpenedRange(self._stream(response, key), partial(_release, response))

    def _client_get(self, key: str, offset: int, length: int) -> Any:
        def get() -> Any:
            try:
                return self._client.get_object(self.bucket, key, offset, length)
            except S3Error as exc:
                if exc.code == "InvalidRange":
                    raise _RangePastEnd(exc.message or "range past end") from exc
                raise

        return self._call(key, get)

    def _stream(self, response: Any, key: str) -> Iterator[bytes]:
        try:
            try:
                yield from response.stream(DEFAULT_CHUNK_BYTES)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                self._raise(exc, key)
        finally:
            _release(response)

    def download_file(self, key: str, path: Path) -> None:
        """See `ObjectStore.download_file`."""
        validate_key(key)
        self._call(key, lambda: self._client.fget_object(self.bucket, key, str(path)))

    def stat(self, key: str) -> ObjectInfo | None:
        """See `ObjectStore.stat`."""
        validate_key(key)
        try:
            obj = self._call(key, lambda: self._client.stat_object(self.bucket, key))
        except NotFound:
            return None
        modified = obj.last_modified or datetime.now(tz=UTC)
        metadata = {
            name.lower().removeprefix(_META_PREFIX): str(value)
            for name, value in (obj.metadata or {}).items()
            if name.lower().startswith(_META_PREFIX)
        }
        return ObjectInfo(
            key=key,
            size=int(obj.size or 0),
            etag=(obj.etag or "").strip('"'),
            last_modified=modified,
            content_type=obj.content_type,
            metadata=metadata,
        )

    def exists(self, key: str) -> bool:
        """See `ObjectStore.exists`."""
        return self.stat(key) is not None

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """See `ObjectStore.list_keys`."""
        self._ensure_bucket()
        return self._list(prefix, start_after)

    def _list(self, prefix: str, start_after: str) -> Iterator[str]:
        try:
            for obj in self._client.list_objects(
                self.bucket, prefix=prefix or None, recursive=True, start_after=start_after or None
            ):
                name = obj.object_name
                # Some servers (SeaweedFS) may report folder markers; they are not objects.
                if name is None or obj.is_dir or name.endswith("/"):
                    continue
                if name > start_after:
                    yield name
        except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, prefix)
        except OSError as exc:
            self._raise(exc, prefix)

    def list_prefixes(self, prefix: str) -> Iterator[str]:
        """See `ObjectStore.list_prefixes`."""
        if prefix and not prefix.endswith("/"):
            raise ValueError("prefix must be empty or end with '/'")
        self._ensure_bucket()
        try:
            names = [
                obj.object_name
                for obj in self._client.list_objects(
                    self.bucket, prefix=prefix or None, recursive=False
                )
                if obj.object_name is not None and obj.object_name.endswith("/")
            ]
        except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
            self._raise(exc, prefix)
        except OSError as exc:
            self._raise(exc, prefix)
        return iter(sorted(names))

    # -- deletes -------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """See `ObjectStore.delete`."""
        validate_key(key)
        try:
            self._call(key, lambda: self._client.remove_object(self.bucket, key))
        except NotFound:
            return


class _RangePastEnd(ImageMeshError):
    """Internal: the requested range starts at or past the object's end."""
