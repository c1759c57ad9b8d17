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

Each call the front serves holds one of its handler threads, a stream for its whole life. So
that open streams cannot take them all, and leave health checks and short calls waiting, a
stream is admitted only while `StreamGate` has a slot: a few threads stay for the short calls,
and a stream beyond the limit gets RESOURCE_EXHAUSTED at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc

from imagemesh.errors import ResourceExhausted
from imagemesh.hot_pool import HotThreadPool
from imagemesh.status import abort_blocking

__all__ = ["BlockingFront", "MethodShape", "StreamGate", "method_shapes", "time_remaining"]

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


class StreamGate:
    """Admits at most `limit` streaming calls at a time (either direction streams): one more
    is refused with RESOURCE_EXHAUSTED, never left waiting for a thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)
        self._refused = 0  # counted under the GIL: only for the log

    @staticmethod
    def for_threads(threads: int) -> StreamGate:
        """The gate for a front of `threads` handler threads: an eighth of them (at least
        two) kept for calls that do not stream."""
        return StreamGate(threads - max(2, threads // 8))

    def _enter(self, context: grpc.ServicerContext) -> None:
        if not self._slots.acquire(blocking=False):
            self._refused += 1
            if self._refused & (self._refused - 1) == 0:  # 1, 2, 4, 8...: never a flood
                _log.warning(
                    "refused a stream: %d open, the most (%d refused so far)",
                    self.limit,
                    self._refused,
                )
            abort_blocking(
                context,
                ResourceExhausted(
                    f"this server already serves {self.limit} streams, its most; retry when "
                    "one ends, or raise IMAGEMESH_SERVER__FRONT_THREADS (its threads, of which "
                    "an eighth stay for calls that do not stream)",
                    reason="TOO_MANY_STREAMS",
                    retry_after_s=1.0,
                ),
            )

    def wrap(
        self, handler: grpc.RpcMethodHandler[Any, Any], shape: MethodShape
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`handler`, gated if it streams; as it is if not."""
        client_streams, server_streams = shape
        if server_streams:
            field = "stream_stream" if client_streams else "unary_stream"
            streamed = getattr(handler, field)

            def gated_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                self._enter(context)
                try:
                    yield from streamed(request, context)
                finally:  # also when the caller leaves (the generator is closed)
                    self._slots.release()

            return handler._replace(**{field: gated_stream})  # type: ignore[attr-defined,no-any-return]
        if client_streams:
            unary = handler.stream_unary
            assert unary is not None  # the shape says so

            def gated_unary(requests: Any, context: grpc.ServicerContext) -> Any:
                self._enter(context)
                try:
                    return unary(requests, context)
                finally:
                    self._slots.release()

            return handler._replace(stream_unary=gated_unary)  # type: ignore[attr-defined,no-any-return]
        return handler


class _Router(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Native handlers first; any other known method is forwarded; unknown ones are
    UNIMPLEMENTED (as the upstream would say)."""

    def __init__(
        self,
        native: Mapping[str, grpc.RpcMethodHandler[Any, Any]],
        shapes: Mapping[str, MethodShape],
        forwarder: _Forwarder,
        gate: StreamGate,
    ) -> None:
        unknown = sorted(set(native) - set(shapes))
        if unknown:  # a programming error: the served services' methods are all in `shapes`
            raise ValueError(f"native handlers for methods of no served service: {unknown}")
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method, shape in shapes.items():
            handler = native.get(method) or forwarder.handler(method, shape)
            self._handlers[method] = gate.wrap(handler, shape)

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
        self.streams = StreamGate.for_threads(threads)
        self._server = grpc.server(
            # Idle handler threads are reused last-in first-out (see `hot_pool`).
            HotThreadPool(threads, thread_name_prefix="imagemesh-front"),  # type: ignore[arg-type]
            handlers=[_Router(native, shapes, _Forwarder(self._channel), self.streams)],
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
