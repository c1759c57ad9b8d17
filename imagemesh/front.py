"""A synchronous gRPC server in front of a process's grpc.aio server, for latency-bound calls.

Why: on grpc.aio a call's handler runs on the event loop, so work done on a thread (the model)
costs two hand-overs, to the thread and back to the loop, and the loop's wake-up holds the
GIL the answer needs. Measured here (one Classify at a time, 32x32 DenseNet121): a bare
grpc.aio server running the model on a thread answered 0.3-0.8 ms later than grpc's
synchronous server running it on the handler's own thread (7 of 7 paired runs), and the
InferenceService's batch-1 overhead was 2.3-2.6 ms on grpc.aio against 1.5-1.8 for a
synchronous server doing the same decoding, model call and ranking.

So a service that needs it (the InferenceService served alone) registers *blocking handlers*
for its hot methods: `BlockingFront` serves those on grpc's synchronous server at the
service's public address, and forwards every other call (its other methods, health,
reflection) unchanged, as bytes, to the process's grpc.aio server listening on a Unix socket
in a private folder. Forwarded calls keep their metadata, deadline, status, details and
trailers (the rich error details ride in trailers); the grpc.aio server's interceptors see
them as they would without the front. The front authenticates every call itself (health stays
open) and observes the calls it serves natively (request id, metrics, access log).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from imagemesh.hot_pool import HotThreadPool

__all__ = ["BlockingFront", "MethodShape", "method_shapes", "time_remaining"]

_log = logging.getLogger(__name__)

# (client streams, server streams) of a method, by full method name ("/pkg.Service/Method").
MethodShape = tuple[bool, bool]

# Metadata gRPC sets itself: forwarding it would duplicate or contradict the channel's own.
_NOT_FORWARDED = ("user-agent", "grpc-", ":")
# A deadline further than this is no deadline (the synchronous server reports ~forever).
_NO_DEADLINE_S = 10 * 365 * 24 * 3600.0


def method_shapes(descriptors: Any) -> dict[str, MethodShape]:
    """The shapes of every method of the given service descriptors."""
    shapes: dict[str, MethodShape] = {}
    for service in descriptors:
        for method in service.methods:
            shapes[f"/{service.full_name}/{method.name}"] = (
                method.client_streaming,
                method.server_streaming,
            )
    return shapes


def _forwarded_metadata(context: grpc.ServicerContext) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(_NOT_FORWARDED)
    )


def time_remaining(context: grpc.ServicerContext) -> float | None:
    """What is left of a synchronous server's call's deadline, None if it has none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else max(0.0, remaining)


def _relay_error(context: grpc.ServicerContext, error: grpc.RpcError) -> None:
    """Ends the call with the upstream's status, details and trailers (raises)."""
    call: Any = error
    context.set_trailing_metadata(tuple(call.trailing_metadata() or ()))
    context.abort(call.code(), call.details() or "")


class _Forwarder:
    """Method handlers that pass calls through to the upstream server, as bytes."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel

    def handler(self, method: str, shape: MethodShape) -> grpc.RpcMethodHandler[Any, Any]:
        client_streams, server_streams = shape
        if not client_streams and not server_streams:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(self._channel.unary_unary(method, None, None))
            )
        if client_streams and not server_streams:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(self._channel.stream_unary(method, None, None))
            )
        if not client_streams:
            return grpc.unary_stream_rpc_method_handler(
                self._streamed(self._channel.unary_stream(method, None, None))
            )
        return grpc.stream_stream_rpc_method_handler(
            self._streamed(self._channel.stream_stream(method, None, None))
        )

    @staticmethod
    def _unary(upstream: Any) -> Callable[[Any, grpc.ServicerContext], bytes]:
        def forward(request: Any, context: grpc.ServicerContext) -> bytes:
            try:
                response, call = upstream.with_call(
                    request, timeout=time_remaining(context), metadata=_forwarded_metadata(context)
                )
            except grpc.RpcError as error:
                _relay_error(context, error)
                raise  # not reached: abort raises
            initial = call.initial_metadata()
            if initial:  # unary answers carry theirs in the trailers (see interceptors)
                context.send_initial_metadata(tuple(initial))
            context.set_trailing_metadata(tuple(call.trailing_metadata() or ()))
            return bytes(response)

        return forward

    @staticmethod
    def _streamed(upstream: Any) -> Callable[[Any, grpc.ServicerContext], Iterator[bytes]]:
        def forward(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
            call = upstream(
                request, timeout=time_remaining(context), metadata=_forwarded_metadata(context)
            )
            # The caller went away (or the front is stopping): so does the upstream call.
            context.add_callback(call.cancel)
            try:
                context.send_initial_metadata(tuple(call.initial_metadata() or ()))
                yield from call
            except grpc.RpcError as error:
                _relay_error(context, error)
            context.set_trailing_metadata(tuple(call.trailing_metadata() or ()))

        return forward


class _Router(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Native handlers first; any other known method is forwarded; unknown ones are
    UNIMPLEMENTED (as the upstream would say)."""

    def __init__(
        self,
        native: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        shapes: Mapping[str, MethodShape],
        forwarder: _Forwarder,
    ) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = dict(native)
        for method, shape in shapes.items():
            if method not in self._handlers:
                self._handlers[method] = forwarder.handler(method, shape)

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)


class BlockingFront:
    """grpc's synchronous server on the public address: native handlers for the hot methods,
    everything else forwarded to `upstream` (the process's grpc.aio server)."""

    def __init__(
        self,
        *,
        native: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        shapes: Mapping[str, MethodShape],
        upstream: str,
        threads: int,
        options: list[tuple[str, Any]],
        interceptors: list[grpc.ServerInterceptor],  # type: ignore[type-arg]
    ) -> None:
        # Forwarded calls carry any size the front accepted, so the channel takes as much.
        self._channel = grpc.insecure_channel(upstream, options=options)
        self._server = grpc.server(
            # Idle handler threads are reused last-in first-out (see `hot_pool`).
            HotThreadPool(threads, thread_name_prefix="imagemesh-front"),  # type: ignore[arg-type]
            handlers=[_Router(native, shapes, _Forwarder(self._channel))],
            interceptors=interceptors,
            options=options,
        )

    def bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        """Listens on `address` (before `start`); returns the bound port (0 if it failed)."""
        if credentials is None:
            return self._server.add_insecure_port(address)
        return self._server.add_secure_port(address, credentials)

    def start(self) -> None:
        """Starts serving (calls on forwarded methods wait for the upstream to answer)."""
        self._server.start()

    def stop(self, grace: float | None) -> None:
        """Stops taking calls, lets those in flight finish within `grace`, then closes the
        channel to the upstream."""
        started = time.monotonic()
        self._server.stop(grace).wait()
        self._channel.close()
        _log.debug("front stopped in %.2f s", time.monotonic() - started)
