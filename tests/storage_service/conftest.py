"""Fixtures for the storage service's tests: an object store on each backend in turn."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagemesh.config import S3Settings, StorageBackend, StorageSettings
from tests.fixtures.engines import S3Bucket

# The same contract runs on the embedded default and on both real S3 servers.
BACKENDS = [
    "local",
    pytest.param("minio", marks=pytest.mark.engines),
    pytest.param("seaweed", marks=pytest.mark.engines),
]


def storage_settings_for(bucket: S3Bucket | None, tmp_path: Path) -> StorageSettings:
    """StorageSettings for a local folder under tmp_path, or for `bucket` when given."""
    if bucket is None:
        return StorageSettings(backend=StorageBackend.LOCAL, local_root=tmp_path / "objects")
    return StorageSettings(
        backend=StorageBackend.S3,
        local_root=tmp_path / "objects",
        s3=S3Settings(
            endpoint=bucket.host,
            access_key=bucket.access_key,
            secret_key=bucket.secret_key,
            bucket=bucket.name,
        ),
    )


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    """StorageSettings for a fresh, empty store on each backend in turn."""
    bucket: S3Bucket | None = None
    if request.param != "local":
        bucket = request.getfixturevalue(f"{request.param}_bucket")
    return storage_settings_for(bucket, tmp_path)
