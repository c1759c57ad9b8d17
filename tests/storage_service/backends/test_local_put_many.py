"""`LocalObjectStore.put_bytes_many`: many small objects, one flush to disk, each still atomic."""

from __future__ import annotations

from pathlib import Path

import pytest

import storage_service.backends.local as local_module
from imagemesh.errors import InvalidArgument
from storage_service.backends.local import LocalObjectStore


def _staging_files(root: Path) -> list[Path]:
    return list((root / ".staging").iterdir())


def test_every_object_is_written_and_replaces_the_previous_one(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("a/1.npy", b"old", metadata={"dtype": "<f4"})
    store.put_bytes_many([("a/1.npy", b"one"), ("b/c/2.npy", b""), ("3.npy", b"three" * 1000)])

    assert store.get_bytes("a/1.npy") == b"one"
    assert store.get_bytes("b/c/2.npy") == b""
    assert store.get_bytes("3.npy") == b"three" * 1000
    # The previous version's metadata went with it, as with put_bytes.
    info = store.stat("a/1.npy")
    assert info is not None
    assert dict(info.metadata) == {}
    assert _staging_files(tmp_path) == []


def test_objects_are_flushed_before_any_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalObjectStore(tmp_path)
    seen: list[tuple[bool, int]] = []

    def flush(fd: int) -> int:
        # At the flush every byte sits in a staging file and no object is visible yet.
        seen.append((store.exists("x/1") or store.exists("x/2"), len(_staging_files(tmp_path))))
        return 0

    monkeypatch.setattr(local_module, "_syncfs", flush)
    store.put_bytes_many([("x/1", b"1"), ("x/2", b"2")])

    assert seen == [(False, 2)]
    assert store.get_bytes("x/1") == b"1"
    assert store.get_bytes("x/2") == b"2"


def test_a_failed_flush_commits_nothing_and_leaves_no_staging_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalObjectStore(tmp_path)
    store.put_bytes("x/1", b"previous")
    monkeypatch.setattr(local_module, "_syncfs", lambda fd: -1)

    with pytest.raises(OSError, match="syncfs"):
        store.put_bytes_many([("x/1", b"new"), ("x/2", b"2")])

    assert store.get_bytes("x/1") == b"previous"
    assert not store.exists("x/2")
    assert _staging_files(tmp_path) == []


def test_an_invalid_key_refuses_the_whole_call_before_writing(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path)
    with pytest.raises(InvalidArgument):
        store.put_bytes_many([("ok/1", b"1"), (".staging/x", b"2")])
    assert not store.exists("ok/1")
    assert _staging_files(tmp_path) == []


def test_objects_survive_another_process_sweeping_the_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalObjectStore(tmp_path)

    def another_process_opens_the_folder(fd: int) -> int:
        LocalObjectStore(tmp_path)  # sweeps the staging folder (fresh files are kept)
        return 0

    monkeypatch.setattr(local_module, "_syncfs", another_process_opens_the_folder)
    store.put_bytes_many([("x/1", b"1"), ("x/2", b"2")])

    assert store.get_bytes("x/1") == b"1"
    assert store.get_bytes("x/2") == b"2"
    assert _staging_files(tmp_path) == []


def test_without_fsync_nothing_is_flushed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(local_module, "_syncfs", lambda fd: calls.append(fd) or 0)
    store = LocalObjectStore(tmp_path, fsync=False)
    store.put_bytes_many([("x/1", b"1")])
    assert calls == []
    assert store.get_bytes("x/1") == b"1"


def _child_temp_prefix(queue) -> None:
    queue.put(local_module._temp_prefix)


def test_a_forked_process_names_its_temp_files_apart_from_its_parent() -> None:
    import multiprocessing

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_temp_prefix, args=(queue,))
    child.start()
    child_prefix = queue.get(timeout=30)
    child.join(30)
    assert child_prefix != local_module._temp_prefix
