"""The ObjectStore contract, run unchanged on the local folder, MinIO and SeaweedFS."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagemesh.config import S3Settings, StorageBackend, StorageSettings
from imagemesh.errors import InvalidArgument, NotFound, Unavailable
from storage_service.backends import ObjectStore, open_object_store
from storage_service.backends.s3 import S3ObjectStore

MIB = 1024 * 1024


@pytest.fixture
def store(backend_settings: StorageSettings) -> ObjectStore:
    return open_object_store(backend_settings)


def _all_keys(store: ObjectStore) -> list[str]:
    return list(store.list_keys(""))


def test_store_satisfies_the_protocol(store: ObjectStore) -> None:
    assert isinstance(store, ObjectStore)


def test_put_bytes_round_trips_and_stat_describes_it(store: ObjectStore) -> None:
    data = os.urandom(1000)
    store.put_bytes("images/ab/one", data, content_type="image/png")
    assert store.get_bytes("images/ab/one") == data
    info = store.stat("images/ab/one")
    assert info is not None
    assert info.key == "images/ab/one"
    assert info.size == 1000
    assert info.etag
    assert info.content_type in (None, "image/png")
    assert store.exists("images/ab/one")


def test_put_bytes_replaces_an_existing_object(store: ObjectStore) -> None:
    store.put_bytes("k", b"first")
    store.put_bytes("k", b"second, longer")
    assert store.get_bytes("k") == b"second, longer"
    assert _all_keys(store) == ["k"]


def test_empty_object_round_trips(store: ObjectStore) -> None:
    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""
    info = store.stat("empty")
    assert info is not None
    assert info.size == 0


def test_put_stream_commits_a_multipart_object(store: ObjectStore) -> None:
    # 12 MiB in 1 MiB chunks: more than one S3 part, so the multipart path runs.
    chunks = [os.urandom(MIB) for _ in range(12)]
    store.put_stream("big/object.bin", iter(chunks), 12 * MIB)
    got = hashlib.sha256(b"".join(store.get_range("big/object.bin"))).hexdigest()
    assert got == hashlib.sha256(b"".join(chunks)).hexdigest()
    info = store.stat("big/object.bin")
    assert info is not None
    assert info.size == 12 * MIB


def test_put_stream_of_unknown_length_commits(store: ObjectStore) -> None:
    store.put_stream("small", iter([b"a", b"", b"bc"]), None)
    assert store.get_bytes("small") == b"abc"


class _Abort(Exception):
    pass


def _failing_chunks(count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield os.urandom(MIB)
    raise _Abort("validation failed")


@pytest.mark.parametrize("mib_before_failure", [1, 11])
def test_put_stream_that_raises_leaves_nothing_behind(
    store: ObjectStore, mib_before_failure: int
) -> None:
    with pytest.raises(_Abort):
        store.put_stream("aborted", _failing_chunks(mib_before_failure), None)
    assert store.stat("aborted") is None
    assert _all_keys(store) == []
    if isinstance(store, S3ObjectStore):
        # The multipart upload itself must be gone, not just invisible.
        uploads = store._client._list_multipart_uploads(store.bucket)
        assert not [u for u in uploads.uploads if u.object_name == "aborted"]


def test_put_stream_aborts_when_the_length_does_not_match(store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="expected 10 bytes"):
        store.put_stream("short", iter([b"12345"]), 10)
    with pytest.raises(ValueError, match="expected 3 bytes"):
        store.put_stream("long", iter([b"12345"]), 3)
    assert _all_keys(store) == []


def test_a_failed_replacement_keeps_the_previous_object(store: ObjectStore) -> None:
    store.put_bytes("keep", b"original")
    with pytest.raises(_Abort):
        store.put_stream("keep", _failing_chunks(1), None)
    assert store.get_bytes("keep") == b"original"


def test_put_file_and_download_file_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    data = os.urandom(3 * MIB + 17)
    source.write_bytes(data)
    store.put_file("files/source.bin", source)
    target = tmp_path / "target.bin"
    store.download_file("files/source.bin", target)
    assert target.read_bytes() == data


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, None), (0, 10), (5, 10), (999, None), (990, 100), (0, 0), (1000, None)],
)
def test_get_range_returns_exactly_the_range(
    store: ObjectStore, offset: int, length: int | None
) -> None:
    data = os.urandom(1000)
    store.put_bytes("ranged", data)
    end = None if length is None else offset + length
    assert b"".join(store.get_range("ranged", offset, length)) == data[offset:end]


def test_get_range_streams_large_objects_in_bounded_chunks(store: ObjectStore) -> None:
    store.put_stream("chunked", (os.urandom(MIB) for _ in range(3)), 3 * MIB)
    chunks = list(store.get_range("chunked", 10))
    assert len(chunks) > 1
    assert max(len(c) for c in chunks) <= MIB
    assert sum(len(c) for c in chunks) == 3 * MIB - 10


def test_missing_objects(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("nope")
    with pytest.raises(NotFound):
        store.get_range("nope")  # raised by the call, before any chunk is read
    with pytest.raises(NotFound):
        store.get_range("nope", 0, 0)
    with pytest.raises(NotFound):
        store.download_file("nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    assert store.stat("nope") is None
    assert not store.exists("nope")
    store.delete("nope")  # idempotent


def test_delete_removes_only_that_object(store: ObjectStore) -> None:
    store.put_bytes("a/b/c", b"1")
    store.put_bytes("a/b/d", b"2")
    store.delete("a/b/c")
    store.delete("a/b/c")
    assert _all_keys(store) == ["a/b/d"]
    store.delete("a/b/d")
    assert _all_keys(store) == []


def test_list_keys_is_lexicographic_with_prefix_and_start_after(store: ObjectStore) -> None:
    # `a-b/x` sorts before `a/b` ('-' < '/'), which a naive folder walk gets wrong.
    keys = ["a/b", "a-b/x", "a/c/d", "a/c/e", "a0", "b", "images/00/x", "images/01/y"]
    for key in keys:
        store.put_bytes(key, b"x")
    assert list(store.list_keys("")) == sorted(keys)
    assert list(store.list_keys("a/")) == ["a/b", "a/c/d", "a/c/e"]
    assert list(store.list_keys("a")) == ["a-b/x", "a/b", "a/c/d", "a/c/e", "a0"]
    assert list(store.list_keys("images/0")) == ["images/00/x", "images/01/y"]
    assert list(store.list_keys("", start_after="a/c/d")) == ["a/c/e", "a0", "b", *keys[-2:]]
    assert list(store.list_keys("a/", start_after="a/b")) == ["a/c/d", "a/c/e"]
    assert list(store.list_keys("a/c/", start_after="a/c/e")) == []
    assert list(store.list_keys("zzz")) == []


def test_list_keys_pages_through_many_keys(store: ObjectStore) -> None:
    keys = [f"many/{i:04d}" for i in range(1200)]  # more than one S3 listing page
    for key in keys:
        store.put_bytes(key, b"")
    assert list(store.list_keys("many/")) == keys
    assert list(store.list_keys("many/", start_after="many/1100")) == keys[1101:]


@pytest.mark.parametrize(
    "key", ["", "/abs", "a//b", "a/../b", "..", "a/./b", "trailing/", "nul\x00", "x" * 1025]
)
def test_unsafe_keys_are_refused(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put_bytes(key, b"x")
    with pytest.raises(InvalidArgument):
        store.stat(key)
    assert _all_keys(store) == []


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_s3_server_is_unavailable(tmp_path: Path) -> None:
    settings = StorageSettings(
        backend=StorageBackend.S3,
        local_root=tmp_path,
        s3=S3Settings(endpoint=f"127.0.0.1:{_dead_port()}", bucket="dead"),
    )
    store = open_object_store(settings)  # cheap: does not connect yet
    with pytest.raises(Unavailable, match="cannot reach the S3 server"):
        store.put_bytes("k", b"x")
    with pytest.raises(Unavailable):
        store.stat("k")


def test_bucket_is_created_when_missing(minio_engine, tmp_path: Path) -> None:
    name = f"created-{os.urandom(6).hex()}"
    settings = StorageSettings(
        backend=StorageBackend.S3,
        local_root=tmp_path,
        s3=S3Settings(
            endpoint=minio_engine.host,
            access_key=minio_engine.access_key,
            secret_key=minio_engine.secret_key,
            bucket=name,
        ),
    )
    store = open_object_store(settings)
    client = minio_engine.client()
    try:
        store.put_bytes("k", b"v")
        assert client.bucket_exists(name)
        assert store.get_bytes("k") == b"v"
    finally:
        store.delete("k")
        client.remove_bucket(name)


def test_local_store_hides_and_sweeps_staging_files(tmp_path: Path) -> None:
    from storage_service.backends.local import LocalObjectStore

    root = tmp_path / "objects"
    LocalObjectStore(root)
    leftover = root / ".staging" / "leftover"
    leftover.write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(leftover, (two_hours_ago, two_hours_ago))
    in_flight = root / ".staging" / "in-flight"
    in_flight.write_bytes(b"being written by another process")
    store = LocalObjectStore(root)  # a restart removes what a crash left long ago...
    assert not leftover.exists()
    # ...but not a temp file another process is writing right now.
    assert in_flight.exists()
    assert list(store.list_keys("")) == []
    with pytest.raises(InvalidArgument):
        store.put_bytes(".staging/x", b"x")


def test_user_metadata_is_written_with_the_object(store: ObjectStore) -> None:
    meta = {"record": "eyJhIjogMX0", "dataset": "flowers"}
    store.put_bytes("with/meta", b"x", "image/png", metadata=meta)
    info = store.stat("with/meta")
    assert info is not None
    assert dict(info.metadata) == meta
    assert info.content_type == "image/png"
    store.put_stream("with/streamed", iter([b"ab", b"c"]), 3, metadata={"gen": "7"})
    streamed = store.stat("with/streamed")
    assert streamed is not None
    assert dict(streamed.metadata) == {"gen": "7"}
    # A rewrite without metadata drops the old metadata.
    store.put_bytes("with/meta", b"y")
    rewritten = store.stat("with/meta")
    assert rewritten is not None
    assert dict(rewritten.metadata) == {}
    store.delete("with/meta")
    store.delete("with/streamed")
    assert _all_keys(store) == []


def test_list_prefixes_lists_direct_sub_folders(store: ObjectStore) -> None:
    for key in ["p/m1/v1/a.npy", "p/m1/v2/a.npy", "p/m2/v1/b.npy", "p/top.npy", "q/x"]:
        store.put_bytes(key, b"")
    assert list(store.list_prefixes("p/")) == ["p/m1/", "p/m2/"]
    assert list(store.list_prefixes("p/m1/")) == ["p/m1/v1/", "p/m1/v2/"]
    assert list(store.list_prefixes("")) == ["p/", "q/"]
    assert list(store.list_prefixes("none/")) == []


@pytest.mark.parametrize("mib", [1, 12])
def test_before_commit_runs_after_every_byte_and_can_veto(store: ObjectStore, mib: int) -> None:
    seen: list[int] = []
    consumed = 0

    def chunks() -> Iterator[bytes]:
        nonlocal consumed
        for _ in range(mib):
            consumed += 1
            yield os.urandom(MIB)

    def veto() -> None:
        seen.append(consumed)
        raise _Abort("image did not validate")

    with pytest.raises(_Abort):
        store.put_stream("vetoed", chunks(), None, before_commit=veto)
    assert seen == [mib]
    assert _all_keys(store) == []
    store.put_stream("kept", chunks(), None, before_commit=lambda: seen.append(-1))
    assert seen == [mib, -1]
    info = store.stat("kept")
    assert info is not None
    assert info.size == mib * MIB


def test_put_bytes_if_absent_writes_once(store: ObjectStore) -> None:
    assert store.put_bytes_if_absent("once", b"first", "image/png", metadata={"gen": "1"})
    assert not store.put_bytes_if_absent("once", b"second", metadata={"gen": "2"})
    assert store.get_bytes("once") == b"first"
    info = store.stat("once")
    assert info is not None
    assert dict(info.metadata) == {"gen": "1"}


def test_concurrent_put_bytes_if_absent_has_one_winner(store: ObjectStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        wins = list(
            pool.map(lambda i: store.put_bytes_if_absent("race", str(i).encode()), range(8))
        )
    assert wins.count(True) == 1
    assert store.get_bytes("race") == str(wins.index(True)).encode()
