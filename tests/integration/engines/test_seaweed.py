"""SeaweedFS is a second, independent S3 server: what its S3 gateway stores, its filer holds."""

from __future__ import annotations

import io
import os
import urllib.request

from tests.fixtures.engines import S3Bucket

FILER_URL = "http://127.0.0.1:8888"


def test_object_put_through_s3_is_stored_by_the_seaweed_filer(seaweed_bucket: S3Bucket) -> None:
    client = seaweed_bucket.client()
    payload = os.urandom(64 * 1024)
    key = "thumbs/cat.webp"
    client.put_object(seaweed_bucket.name, key, io.BytesIO(payload), len(payload))

    response = client.get_object(seaweed_bucket.name, key)
    try:
        assert response.read() == payload
    finally:
        response.close()
        response.release_conn()
    # SeaweedFS keeps S3 buckets as folders under /buckets in its filer: reading the same bytes
    # through the filer's own HTTP API shows this is SeaweedFS storing them, not a look-alike.
    url = f"{FILER_URL}/buckets/{seaweed_bucket.name}/{key}"
    with urllib.request.urlopen(url, timeout=10) as filer:
        assert filer.read() == payload
