"""Turns domain errors into gRPC statuses with `google.rpc` details.

The details ride in the `grpc-status-details-bin` trailer (grpcio-status), so a client in
any language can read `BadRequest` field violations, the `ErrorInfo` reason, and
`RetryInfo` on UNAVAILABLE and RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imagemesh.errors import (
    ImageMeshError,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from imagemesh.interceptors import REQUEST_ID_KEY, current_request_id

__all__ = ["DOMAIN", "abort_blocking", "abort_with", "error_to_status", "status_code_of"]

DOMAIN = "imagemesh.dev"
_log = logging.getLogger(__name__)


def status_code_of(error: ImageMeshError) -> grpc.StatusCode:
    """The gRPC status code a domain error maps to."""
    return grpc.StatusCode[error.code_name]


def error_to_status(error: ImageMeshError) -> grpc.Status:
    """A `grpc.Status` carrying the error's code, message and rich details."""
    code = status_code_of(error)
    details: list[any_pb2.Any] = []

    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN)
    packed = any_pb2.Any()
    packed.Pack(info)
    details.append(packed)

    if isinstance(error, InvalidArgument) and error.violations:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        details.append(packed)

    if isinstance(error, ResourceExhausted | Unavailable) and error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(error.retry_after_s * 1000))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(packed)

    status = status_pb2.Status(
        code=getattr(code_pb2, code.name), message=error.message, details=details
    )
    return rpc_status.to_status(status)


def _abort_parts(error: ImageMeshError) -> tuple[grpc.StatusCode, str, tuple[Any, ...]]:
    status = error_to_status(error)
    trailing = tuple(status.trailing_metadata)
    # The abort's trailers replace any set before, so the request id goes in with the details.
    request_id = current_request_id()
    if request_id:
        trailing += ((REQUEST_ID_KEY, request_id),)
    return status.code, status.details, trailing


async def abort_with(
    context: grpc.aio.ServicerContext[object, object], error: ImageMeshError
) -> NoReturn:
    """Ends the call with the error's status and details, and the call's request id."""
    code, details, trailing = _abort_parts(error)
    await context.abort(code, details, trailing)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises


def abort_blocking(context: grpc.ServicerContext, error: ImageMeshError) -> NoReturn:
    """`abort_with`, for a handler of grpc's synchronous server."""
    code, details, trailing = _abort_parts(error)
    context.set_trailing_metadata(trailing)
    context.abort(code, details)
    raise AssertionError("abort returned")  # pragma: no cover - abort raises
