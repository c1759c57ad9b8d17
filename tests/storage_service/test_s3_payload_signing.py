"""Which multipart uploads skip the payload hash in their signature (no server needed).

Skipping it saves a second full SHA-256 of every part, but it also drops the server's check
that the bytes arrived as signed; only TLS or a loopback connection may do without it.
"""

from __future__ import annotations

import pytest

from imagemesh.config import S3Settings
from storage_service.backends.s3 import S3ObjectStore


def _store(endpoint: str, secure: bool) -> S3ObjectStore:
    return S3ObjectStore(
        S3Settings(
            endpoint=endpoint, access_key="k", secret_key="secret", bucket="b", secure=secure
        )
    )


@pytest.mark.parametrize(
    ("endpoint", "secure", "unsigned"),
    [
        ("127.0.0.1:9000", False, True),
        ("localhost:9000", False, True),
        ("[::1]:9000", False, True),
        ("minio.internal:9000", True, True),
        ("minio.internal:9000", False, False),
        ("10.1.2.3:9000", False, False),
    ],
)
def test_parts_are_signed_with_their_payload_unless_the_transport_protects_it(
    endpoint: str, secure: bool, unsigned: bool
) -> None:
    headers = _store(endpoint, secure)._part_headers
    assert (headers.get("x-amz-content-sha256") == "UNSIGNED-PAYLOAD") is unsigned
