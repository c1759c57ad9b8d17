"""An `ObjectStore` on a local folder: the embedded default.

Object `a/b/c` is the file `{root}/a/b/c`. Every write goes to a temp file under
`{root}/.staging/`, is flushed to disk, then renamed into place with `os.replace`, so a
reader never sees a partial object and a crash leaves at worst a stray temp file (removed at
the next start). User metadata and the content type, when given, live in a JSON sidecar
`{root}/.meta/{key}`, written before the object and removed after it, so an object never
shows without its metadata. `.staging` and `.meta` are not valid first key segments, so they
never show in listings.

`put_bytes_many` (this backend only) writes many small objects with one flush to disk for
all of them instead of one per object: each is still renamed into place only once its bytes
are on disk, so the guarantee above holds object by object.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from imagemesh.errors import InvalidArgument, NotFound, Unavailable
from storage_service.backends import DEFAULT_CHUNK_BYTES, ObjectInfo, OpenedRange
from storage_service.backends.keys import validate_key

__all__ = ["LocalObjectStore"]

_STAGING = ".staging"
_META = ".meta"
_RESERVED = {_STAGING, _META}
_STALE_TEMP_S = 3600.0


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's `syncfs(fd)` (Linux): flushes the one filesystem that holds `fd`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()
# Names of temp files `put_bytes_many` writes: unique in the process without a random-number
# syscall per object (uuid4 costs one); the uuid prefix keeps processes apart.
_temp_prefix = uuid.uuid4().hex
_temp_counter = itertools.count()


def _new_temp_prefix() -> None:
    # A forked child (pyspark forks its Python workers) would otherwise reuse its parent's
    # prefix and counter, and two processes would race for the same temp names.
    global _temp_prefix, _temp_counter
    _temp_prefix = uuid.uuid4().hex
    _temp_counter = itertools.count()


os.register_at_fork(after_in_child=_new_temp_prefix)


class LocalObjectStore:
    """Objects as files under `root`; see the module docstring."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = Path(root)
        # fsync before the rename makes a committed object survive a power cut; tests and
        # throwaway stores may turn it off.
        self._fsync = fsync
        self._staging = self.root / _STAGING
        self._create_lock = threading.Lock()
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise Unavailable(f"cannot create the object folder {self.root}: {exc}") from exc
        # Temp files of writes a crash interrupted. Other processes open the same folder
        # (Spark workers, a second service) while writes are in flight, so only files that
        # nobody has written to for an hour go: a live write touches its file on every chunk.
        stale_before = time.time() - _STALE_TEMP_S
        for stray in self._staging.iterdir():
            with contextlib.suppress(OSError):
                if stray.stat().st_mtime < stale_before:
                    stray.unlink()

    # -- paths ---------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        validate_key(key)
        if key.split("/", 1)[0] in _RESERVED:
            raise InvalidArgument(
                f"object key must not start with {_STAGING!r} or {_META!r}",
                reason="INVALID_OBJECT_KEY",
            )
        return self.root / key

    def _sidecar(self, key: str) -> Path:
        return self.root / _META / key

    def _write_atomically(
        self,
        key: str,
        fill: Callable[[IO[bytes]], None],
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        target = self._path(key)
        if metadata:
            sidecar = json.dumps({"content_type": content_type, "metadata": dict(metadata)})

            def fill_sidecar(out: IO[bytes]) -> None:
                out.write(sidecar.encode())

            self._replace_file(self._sidecar(key), fill_sidecar)
        else:
            # A previous version's metadata must not survive a rewrite without metadata.
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._sidecar(key).unlink()
        self._replace_file(target, fill)

    def _replace_file(self, target: Path, fill: Callable[[IO[bytes]], None]) -> None:
        temp = self._staging / uuid.uuid4().hex
        try:
            with temp.open("wb") as out:
                fill(out)
                out.flush()
                if self._fsync:
                    os.fsync(out.fileno())
            # A concurrent delete may remove an emptied parent folder between mkdir and
            # replace; recreate it and retry once.
            for attempt in range(2):
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.replace(temp, target)
                    break
                except FileNotFoundError:
                    if attempt:
                        raise
        except BaseException:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise

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

        def fill(out: IO[bytes]) -> None:
            out.write(data)

        self._write_atomically(key, fill, content_type, metadata)

    def put_bytes_many(
        self,
        objects: Sequence[tuple[str, bytes]],
        content_type: str = "application/octet-stream",
    ) -> None:
        """Writes each `(key, data)` as `put_bytes` would (no metadata), flushed to disk together.

        Every object is written to a temp file, then all of them are flushed with one
        `syncfs` of the store's filesystem (Linux; elsewhere one fsync each), then each is
        renamed into place. So each object is atomic and durable exactly as with `put_bytes`
        (a reader sees the previous object or the whole new one; a renamed object's bytes are
        on disk), while the disk sees one journal commit for the lot instead of one per
        object: per-object fsync was most of the CPU a batch job spent per image. The flush
        also writes back other writers' dirty data on the same filesystem, which a store on
        its own volume does not have. If this raises, objects already renamed stay written
        and the others are not (no temp file is left behind).
        """
        del content_type  # the local folder keeps no content type for bare objects
        targets = [self._path(key) for key, _ in objects]
        staging = os.fspath(self._staging)
        temps: list[str] = []
        descriptors: list[int] = []
        try:
            # Opened before the writes: syncfs reports write-back errors seen since then.
            folder = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            descriptors.append(folder)
            for _, data in objects:
                temp = f"{staging}/{_temp_prefix}-{next(_temp_counter)}"
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                temps.append(temp)
                descriptors.append(fd)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if _syncfs is not None or not self._fsync:
                    # Not needed for the flush: closed now, so that a large call never runs
                    # out of file descriptors.
                    descriptors.pop()
                    os.close(fd)
            if self._fsync:
                if _syncfs is not None:
                    if _syncfs(folder) != 0:
                        error = ctypes.get_errno()
                        raise OSError(error, f"syncfs({staging}): {os.strerror(error)}")
                else:
                    for fd in descriptors[1:]:
                        os.fsync(fd)
            for (key, data), target, temp in zip(objects, targets, temps, strict=True):
                # A previous version's metadata must not survive a rewrite without metadata.
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    os.unlink(self._sidecar(key))
                try:
                    os.replace(temp, target)
                except FileNotFoundError:
                    if not os.path.exists(temp):
                        # Another process opening this folder swept the staging files as
                        # a crash's leftovers: write this object again on its own.
                        self.put_bytes(key, data)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(temp, target)
        except BaseException:
            for temp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        finally:
            for fd in descriptors:
                os.close(fd)

    def put_bytes_if_absent(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """See `ObjectStore.put_bytes_if_absent`."""
        # One process owns a local folder; the lock makes check-and-write atomic in it.
        with self._create_lock:
            if self.exists(key):
                return False
            self.put_bytes(key, data, content_type, metadata=metadata)
            return True

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
        """See `ObjectStore.put_stream`."""

        def fill(out: IO[bytes]) -> None:
            total = 0
            for chunk in chunks:
                out.write(chunk)
                total += len(chunk)
            if length is not None and total != length:
                raise ValueError(f"put_stream for {key!r}: expected {length} bytes, got {total}")
            if before_commit is not None:
                before_commit()

        self._write_atomically(key, fill, content_type, metadata)

    def put_file(self, key: str, path: Path) -> None:
        """See `ObjectStore.put_file`."""
        with Path(path).open("rb") as source:
            self._write_atomically(key, lambda out: shutil.copyfileobj(source, out))

    # -- reads ---------------------------------------------------------------------------

    def _open(self, key: str) -> IO[bytes]:
        path = self._path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(f"no object {key!r}") from exc

    def get_bytes(self, key: str) -> bytes:
        """See `ObjectStore.get_bytes`."""
        with self._open(key) as source:
            return source.read()

    def get_range(self, key: str, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """See `ObjectStore.get_range`."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must not be negative")
        source = self._open(key)  # raises NotFound now, not at the first next()
        return OpenedRange(_read_range(source, offset, length), source.close)

    def download_file(self, key: str, path: Path) -> None:
        """See `ObjectStore.download_file`."""
        path = Path(path)
        with self._open(key) as source:
            temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            try:
                with temp.open("wb") as out:
                    shutil.copyfileobj(source, out, DEFAULT_CHUNK_BYTES)
                os.replace(temp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    temp.unlink()
                raise

    def stat(self, key: str) -> ObjectInfo | None:
        """See `ObjectStore.stat`."""
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        content_type: str | None = None
        metadata: dict[str, str] = {}
        try:
            sidecar = json.loads(self._sidecar(key).read_bytes())
            content_type, metadata = sidecar["content_type"], sidecar["metadata"]
        except (FileNotFoundError, NotADirectoryError):
            pass
        return ObjectInfo(
            key=key,
            size=st.st_size,
            etag=f"{st.st_mtime_ns:x}-{st.st_size:x}",
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            content_type=content_type,
            metadata=metadata,
        )

    def exists(self, key: str) -> bool:
        """See `ObjectStore.exists`."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str, start_after: str = "") -> Iterator[str]:
        """See `ObjectStore.list_keys`."""
        # Start at the deepest folder the prefix fully names; filter the rest by string.
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        folder = self.root / base if base else self.root
        return self._walk(folder, base, prefix, start_after)

    def _walk(self, folder: Path, rel: str, prefix: str, start_after: str) -> Iterator[str]:
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        # Sort a folder `x` as `x/`, so the walk yields full keys in code-point order even
        # when a sibling file name sorts between `x` and `x/` (e.g. `x-1` vs `x/a`).
        named: list[tuple[str, os.DirEntry[str]]] = []
        for entry in entries:
            if not rel and entry.name in _RESERVED:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            named.append((rel + entry.name + ("/" if is_dir else ""), entry))
        named.sort(key=lambda item: item[0])
        for name, entry in named:
            if name.endswith("/"):
                # Skip subtrees outside the prefix or wholly at or before start_after.
                if not (name.startswith(prefix) or prefix.startswith(name)):
                    continue
                if start_after > name and not start_after.startswith(name):
                    continue
                yield from self._walk(Path(entry.path), name, prefix, start_after)
            elif name.startswith(prefix) and name > start_after:
                yield name

    def list_prefixes(self, prefix: str) -> Iterator[str]:
        """See `ObjectStore.list_prefixes`."""
        if prefix and not prefix.endswith("/"):
            raise ValueError("prefix must be empty or end with '/'")
        if prefix:
            self._path(prefix.rstrip("/"))
        folder = self.root / prefix if prefix else self.root
        try:
            names = sorted(
                entry.name + "/"
                for entry in os.scandir(folder)
                if entry.is_dir(follow_symlinks=False) and (prefix or entry.name not in _RESERVED)
            )
        except (FileNotFoundError, NotADirectoryError):
            return iter(())
        return iter([prefix + name for name in names])

    # -- deletes -------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """See `ObjectStore.delete`."""
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):
            return
        finally:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._sidecar(key).unlink()
        self._prune(path.parent, self.root)
        self._prune(self._sidecar(key).parent, self.root / _META)

    @staticmethod
    def _prune(parent: Path, stop: Path) -> None:
        # Remove folders a deletion emptied, so listings and the disk stay tidy.
        while parent != stop and parent != parent.parent:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _read_range(source: IO[bytes], offset: int, length: int | None) -> Iterator[bytes]:
    with source:
        source.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            want = DEFAULT_CHUNK_BYTES if remaining is None else min(remaining, DEFAULT_CHUNK_BYTES)
            chunk = source.read(want)
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk
