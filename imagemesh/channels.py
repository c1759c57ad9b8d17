"""Client channels to imagemesh services, with the deployment's TLS and token.

Services call each other, and the CLI calls services, through `open_channel`, so a
deployment that turns on TLS, mutual TLS or a bearer token needs no code change anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from imagemesh.auth import AUTHORIZATION_KEY
from imagemesh.config import Settings

__all__ = ["channel_options", "open_channel", "open_sync_channel"]


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Message limits and keepalive matching the servers'."""
    s = settings.server
    return [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", int(s.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
    ]


class _BearerToken(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        callback(((AUTHORIZATION_KEY, self._header),), None)


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path is not None else None


def _credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    s = settings.server
    if s.tls_ca_file is None and s.tls_cert_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(s.tls_ca_file),
        private_key=_read(s.tls_key_file),
        certificate_chain=_read(s.tls_cert_file),
    )


def open_channel(address: str, settings: Settings) -> grpc.aio.Channel:
    """An async channel to `address`, secured as the settings say."""
    options = channel_options(settings)
    tls = _credentials(settings)
    if tls is None:
        if settings.auth_token:
            # Tokens over plaintext are for loopback and trusted networks only; gRPC refuses
            # call credentials on insecure channels, so the token is sent as plain metadata.
            return grpc.aio.insecure_channel(
                address,
                options=options,
                interceptors=_token_interceptors(settings.auth_token),
            )
        return grpc.aio.insecure_channel(address, options=options)
    creds = tls
    if settings.auth_token:
        creds = grpc.composite_channel_credentials(
            tls, grpc.metadata_call_credentials(_BearerToken(settings.auth_token))
        )
    return grpc.aio.secure_channel(address, creds, options=options)


def open_sync_channel(address: str, settings: Settings) -> grpc.Channel:
    """A blocking channel to `address`, secured as the settings say (CLI, Spark workers)."""
    options = channel_options(settings)
    tls = _credentials(settings)
    if tls is None:
        channel = grpc.insecure_channel(address, options=options)
        if settings.auth_token:
            return grpc.intercept_channel(channel, _SyncToken(settings.auth_token))
        return channel
    creds = tls
    if settings.auth_token:
        creds = grpc.composite_channel_credentials(
            tls, grpc.metadata_call_credentials(_BearerToken(settings.auth_token))
        )
    return grpc.secure_channel(address, creds, options=options)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds the bearer token to every call on a plaintext blocking channel."""

    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_sync_token(details, self._token), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_with_sync_token(details, self._token), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_sync_token(details, self._token), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_with_sync_token(details, self._token), requests)


class _SyncCallDetails(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def _with_sync_token(details: Any, token: str) -> Any:
    pairs = list(details.metadata or ())
    pairs.append((AUTHORIZATION_KEY, f"Bearer {token}"))
    return _SyncCallDetails(details, tuple(pairs))


def _with_token(client_call_details: Any, token: str) -> Any:
    pairs = list(client_call_details.metadata or ())
    pairs.append((AUTHORIZATION_KEY, f"Bearer {token}"))
    return client_call_details._replace(metadata=grpc.aio.Metadata(*pairs))


# grpc.aio files each interceptor under the first kind it matches, so one object cannot cover
# all four kinds of call: each kind gets its own small class.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _StreamUnaryToken(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._token), requests)


class _StreamStreamToken(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self._token), requests)


def _token_interceptors(token: str) -> list[Any]:
    """Interceptors that add the bearer token to every kind of call on a plaintext channel."""
    return [
        _UnaryUnaryToken(token),
        _UnaryStreamToken(token),
        _StreamUnaryToken(token),
        _StreamStreamToken(token),
    ]
