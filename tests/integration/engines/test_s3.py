"""Both S3 servers (MinIO and SeaweedFS) store and return objects byte for byte."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
from minio.error import S3Error

from tests.fixtures.engines import S3Bucket


def test_put_then_get_round_trips_bytes_and_metadata(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.client()
    payload = os.urandom(256 * 1024)
    key = "images/round-trip.png"
    client.put_object(
        s3_bucket.name,
        key,
        io.BytesIO(payload),
        len(payload),
        content_type="image/png",
        metadata={"sha256": hashlib.sha256(payload).hexdigest()},
    )

    stat = client.stat_object(s3_bucket.name, key)
    assert stat.size == len(payload)
    assert stat.content_type == "image/png"
    assert stat.metadata is not None
    assert stat.metadata.get("x-amz-meta-sha256") == hashlib.sha256(payload).hexdigest()
    response = client.get_object(s3_bucket.name, key)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()


def test_multipart_upload_of_a_large_object_round_trips(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.client()
    # Above the SDK's 5 MiB part size with an unknown length, so it takes the multipart path.
    payload = os.urandom(11 * 1024 * 1024)
    key = "images/large.bin"
    client.put_object(s3_bucket.name, key, io.BytesIO(payload), -1, part_size=5 * 1024 * 1024)
    response = client.get_object(s3_bucket.name, key)
    try:
        assert hashlib.sha256(response.read()).digest() == hashlib.sha256(payload).digest()
    finally:
        response.close()
        response.release_conn()


def test_deleted_object_is_gone(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.client()
    client.put_object(s3_bucket.name, "gone.txt", io.BytesIO(b"bye"), 3)
    client.remove_object(s3_bucket.name, "gone.txt")
    with pytest.raises(S3Error) as raised:
        client.stat_object(s3_bucket.name, "gone.txt")
    assert raised.value.code in {"NoSuchKey", "NoSuchObject"}


def test_each_test_gets_its_own_empty_bucket(s3_bucket: S3Bucket) -> None:
    client = s3_bucket.client()
    assert client.bucket_exists(s3_bucket.name)
    assert list(client.list_objects(s3_bucket.name, recursive=True)) == []
