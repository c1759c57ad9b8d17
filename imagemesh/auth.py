"""Bearer-token authentication for every RPC but health checks.

When `auth_token` is configured, a call must carry `authorization: Bearer <token>` metadata or
it ends with UNAUTHENTICATED before any handler runs. Health checks stay open so that load
balancers and Kubernetes probes, which carry no credentials, keep working.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = [
    "AUTHORIZATION_KEY",
    "BlockingTokenAuthInterceptor",
    "TokenAuthInterceptor",
    "bearer_metadata",
    "refusal",
]

AUTHORIZATION_KEY = "authorization"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates with `token` (empty when there is no token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()


def refusal(method: str, metadata: Any, expected: bytes) -> str | None:
    """Why a call to `method` with `metadata` is refused, or None if it may go on."""
    if method.startswith(_OPEN_PREFIXES):
        return None
    presented = ""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            presented = value
    if not presented:
        return "this server requires 'authorization: Bearer <token>' metadata"
    if not hmac.compare_digest(presented.encode(), expected):
        return "the bearer token is not valid for this server"
    return None


def _deny(message: str) -> grpc.RpcMethodHandler[Any, Any]:
    async def abort(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # A unary-unary handler also ends streaming calls: the status is sent before any message.
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses calls without the configured bearer token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        refused = refusal(
            handler_call_details.method, handler_call_details.invocation_metadata, self._expected
        )
        if refused is not None:
            return _deny(refused)
        return await continuation(handler_call_details)


def _deny_blocking(
    message: str, shape: grpc.RpcMethodHandler[Any, Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler refusing the call, of the refused method's own shape (grpc's synchronous
    server refuses a streaming call to a unary handler as UNIMPLEMENTED)."""

    def abort(request: Any, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if shape.request_streaming and shape.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if shape.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if shape.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class BlockingTokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """`TokenAuthInterceptor` for grpc's synchronous server (`imagemesh.front`)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: UNIMPLEMENTED, whoever asks
            return None
        refused = refusal(
            handler_call_details.method, handler_call_details.invocation_metadata, self._expected
        )
        return handler if refused is None else _deny_blocking(refused, handler)
