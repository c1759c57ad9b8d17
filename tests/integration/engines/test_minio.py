"""MinIO runs erasure coded over four drive folders, survives losing one and heals it."""

from __future__ import annotations

import io
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.fixtures.engines import S3Bucket, S3Engine, engine_state_dir

# Large enough that MinIO stores the object as part files on every drive instead of inlining it
# in xl.meta (it inlines small objects), so losing a drive really loses a quarter of the data.
OBJECT_SIZE = 3 * 1024 * 1024
# MinIO looks for replaced drives every few seconds and then heals them; 15 s here.
HEAL_TIMEOUT_S = 180.0


def _drives() -> list[Path]:
    return [engine_state_dir("minio") / "data" / f"d{i}" for i in range(1, 5)]


def _cluster_healthy(engine: S3Engine) -> bool:
    try:
        with urllib.request.urlopen(f"{engine.endpoint}/minio/health/cluster", timeout=5) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _shard_files(drive: Path, bucket: str, key: str) -> list[Path]:
    return sorted(p for p in (drive / bucket / key).rglob("*") if p.is_file())


def test_object_reads_back_whole_after_a_drive_is_lost_and_the_drive_heals(
    minio_engine: S3Engine, minio_bucket: S3Bucket
) -> None:
    drives = _drives()
    client = minio_bucket.client()
    payload = os.urandom(OBJECT_SIZE)
    key = "photos/lost-drive.bin"
    client.put_object(minio_bucket.name, key, io.BytesIO(payload), len(payload))

    if not all(_shard_files(d, minio_bucket.name, key) for d in drives):
        pytest.skip("MinIO on :9000 is not the one engines.sh runs on these drive folders")
    # Every drive holds metadata plus its own part file: data is spread, not copied whole.
    assert all(
        any(p.name.startswith("part.") for p in _shard_files(d, minio_bucket.name, key))
        for d in drives
    )

    lost = drives[1]
    # Renamed away first, in one atomic step: MinIO keeps writing into its drives (background
    # scans, temp files), and removing the folder in place raced those writes ("Directory not
    # empty"). What MinIO still writes through open handles lands in the renamed folder.
    gone = lost.with_name(f"{lost.name}.lost-{os.getpid()}")
    os.rename(lost, gone)
    shutil.rmtree(gone, ignore_errors=True)
    try:
        response = client.get_object(minio_bucket.name, key)
        try:
            assert response.read() == payload
        finally:
            response.close()
            response.release_conn()
        # Two data plus two parity shards: three drives still make a write quorum.
        assert _cluster_healthy(minio_engine)
    finally:
        # An empty folder in its place is a "replaced drive": MinIO formats it and heals onto it.
        lost.mkdir(exist_ok=True)
        shutil.rmtree(gone, ignore_errors=True)

    deadline = time.monotonic() + HEAL_TIMEOUT_S
    while not _shard_files(lost, minio_bucket.name, key):
        assert time.monotonic() < deadline, f"MinIO did not heal {lost} in {HEAL_TIMEOUT_S}s"
        time.sleep(1)
    assert (lost / ".minio.sys" / "format.json").is_file()
    assert _cluster_healthy(minio_engine)
    response = client.get_object(minio_bucket.name, key)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def test_minio_lists_what_was_written(minio_bucket: S3Bucket) -> None:
    client = minio_bucket.client()
    for name in ("a.jpg", "b.jpg", "nested/c.jpg"):
        client.put_object(minio_bucket.name, name, io.BytesIO(b"x" * 10), 10)
    listed = sorted(
        o.object_name or "" for o in client.list_objects(minio_bucket.name, recursive=True)
    )
    assert listed == ["a.jpg", "b.jpg", "nested/c.jpg"]
