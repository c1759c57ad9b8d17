"""Opaque, tamper-evident page tokens.

A token is the URL-safe base64 of a small JSON payload plus an HMAC-SHA256 over it and the
query it belongs to, so a client can neither forge a position nor reuse a token with another
query; both come back as `InvalidArgument`. Tokens may carry an expiry (search cursors that
hold a point in time do).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from typing import Any

from imagemesh.errors import InvalidArgument

__all__ = ["PageTokenCodec"]

_MAC_BYTES = 16


class PageTokenCodec:
    """Encodes and verifies page tokens with one secret key."""

    def __init__(self, secret: str | bytes = "") -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        # A random key per process when none is configured: tokens then do not survive a
        # restart, which is safe (clients get INVALID_ARGUMENT and start over).
        self._key = secret or os.urandom(32)

    def _mac(self, body: bytes, query: str) -> bytes:
        digest = hmac.new(self._key, body + b"\x00" + query.encode(), hashlib.sha256)
        return digest.digest()[:_MAC_BYTES]

    def encode(
        self, position: dict[str, Any], *, query: str = "", ttl_s: float | None = None
    ) -> str:
        """A token for `position` within `query` (any string that identifies the query)."""
        payload: dict[str, Any] = {"p": position}
        if ttl_s is not None:
            payload["e"] = round(time.time() + ttl_s, 3)
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        raw = self._mac(body, query) + body
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, *, query: str = "", field: str = "page_token") -> dict[str, Any]:
        """The position in `token`; raises `InvalidArgument` if it is forged, foreign or expired."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (ValueError, TypeError):
            raw = b""
        mac, body = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
        if len(raw) <= _MAC_BYTES or not hmac.compare_digest(mac, self._mac(body, query)):
            raise InvalidArgument(
                "page_token was not issued by this server for this query; "
                "start again with an empty page_token",
                reason="INVALID_PAGE_TOKEN",
                field=field,
            )
        payload = json.loads(body)
        expiry = payload.get("e")
        if expiry is not None and time.time() > float(expiry):
            raise InvalidArgument(
                "page_token has expired; start again with an empty page_token",
                reason="EXPIRED_PAGE_TOKEN",
                field=field,
            )
        position = payload["p"]
        assert isinstance(position, dict)
        return position
