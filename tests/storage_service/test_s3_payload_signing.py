"""Which multipart parts skip the payload hash in their signature (no server needed).

Skipping it saves a second full SHA-256 of every part, but it also drops the server's check
that the bytes arrived as signed: only a loopback connection may do without it; over TLS the
SDK's own choice (UNSIGNED-PAYLOAD with a Content-MD5) stands.
"""

from __future__ import annotations

import hashlib

import pytest
from minio.credentials import Credentials

from imagemesh.config import S3Settings
from storage_service.backends.s3 import S3ObjectStore

_HASH = "x-amz-content-sha256"


def _store(endpoint: str, secure: bool) -> S3ObjectStore:
    return S3ObjectStore(
        S3Settings(
            endpoint=endpoint, access_key="k", secret_key="secret", bucket="b", secure=secure
        )
    )


def _part_headers(store: S3ObjectStore, body: bytes) -> dict[str, str]:
    """The headers the SDK would sign for one part sent with the store's part headers."""
    built, _ = store._client._build_headers(
        store.endpoint, dict(store._part_headers), body, Credentials("k", "secret")
    )
    return dict(built)


@pytest.mark.parametrize(
    ("endpoint", "secure", "payload_hash"),
    [
        ("127.0.0.1:9000", False, "UNSIGNED-PAYLOAD"),
        ("localhost:9000", False, "UNSIGNED-PAYLOAD"),
        ("[::1]:9000", False, "UNSIGNED-PAYLOAD"),
        ("10.1.2.3:9000", False, "sha256"),
        ("minio.internal:9000", False, "sha256"),
        ("minio.internal:9000", True, "UNSIGNED-PAYLOAD"),
    ],
)
def test_parts_are_signed_with_their_payload_unless_nothing_on_the_way_can_alter_it(
    endpoint: str, secure: bool, payload_hash: str
) -> None:
    body = b"part bytes" * 100
    headers = _part_headers(_store(endpoint, secure), body)
    expected = hashlib.sha256(body).hexdigest() if payload_hash == "sha256" else payload_hash
    assert headers[_HASH] == expected
    assert headers["Content-Length"] == str(len(body))
    # Over TLS the SDK's own headers stand, Content-MD5 included.
    assert ("Content-MD5" in headers) is secure
