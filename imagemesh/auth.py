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

__all__ = ["AUTHORIZATION_KEY", "TokenAuthInterceptor", "bearer_metadata"]

AUTHORIZATION_KEY = "authorization"
_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that authenticates with `token` (empty when there is no token)."""
    return ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else ()


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
        method: str = handler_call_details.method
        if method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTHORIZATION_KEY and isinstance(value, str):
                presented = value
        if not presented:
            return _deny("this server requires 'authorization: Bearer <token>' metadata")
        if not hmac.compare_digest(presented.encode(), self._expected):
            return _deny("the bearer token is not valid for this server")
        return await continuation(handler_call_details)
