"""Domain errors shared by every service; they carry no transport.

Domain code raises these; each service's gRPC layer turns them into a status code with
`google.rpc` details (see `imagemesh.status`). The hierarchy, with the code each maps to:

    ImageMeshError                      (INTERNAL)
    ├── InvalidArgument                 (INVALID_ARGUMENT, with field violations)
    ├── NotFound                        (NOT_FOUND)
    ├── AlreadyExists                   (ALREADY_EXISTS)
    ├── FailedPrecondition              (FAILED_PRECONDITION)
    ├── ResourceExhausted               (RESOURCE_EXHAUSTED, with a retry delay)
    ├── DeadlineExceeded                (DEADLINE_EXCEEDED)
    ├── Cancelled                       (CANCELLED)
    ├── Unavailable                     (UNAVAILABLE, with a retry delay)
    └── Unimplemented                   (UNIMPLEMENTED)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "ImageMeshError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "Unimplemented",
]


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: which one, and why."""

    field: str
    description: str


class ImageMeshError(Exception):
    """Base of every error the domain raises on purpose.

    `reason` is a stable UPPER_SNAKE_CASE identifier that clients can switch on;
    the message is for people.
    """

    code_name = "INTERNAL"
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(ImageMeshError):
    """The request is wrong and retrying it unchanged cannot succeed."""

    code_name = "INVALID_ARGUMENT"
    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations = list(violations or [])
        if field is not None:
            self.violations.append(FieldViolation(field, message))


class NotFound(ImageMeshError):
    """The named resource does not exist."""

    code_name = "NOT_FOUND"
    default_reason = "NOT_FOUND"


class AlreadyExists(ImageMeshError):
    """A resource with that identity exists already, with other contents."""

    code_name = "ALREADY_EXISTS"
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ImageMeshError):
    """The system is not in a state where the request can run (e.g. no model yet)."""

    code_name = "FAILED_PRECONDITION"
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(ImageMeshError):
    """A limit or a queue is full; `retry_after_s` says when to try again, if known."""

    code_name = "RESOURCE_EXHAUSTED"
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, reason: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ImageMeshError):
    """The caller's deadline passed before the work was done."""

    code_name = "DEADLINE_EXCEEDED"
    default_reason = "DEADLINE_EXCEEDED"


class Cancelled(ImageMeshError):
    """The caller cancelled."""

    code_name = "CANCELLED"
    default_reason = "CANCELLED"


class Unavailable(ImageMeshError):
    """A backend cannot be reached; the same request may succeed later."""

    code_name = "UNAVAILABLE"
    default_reason = "BACKEND_UNAVAILABLE"

    def __init__(
        self, message: str, *, reason: str | None = None, retry_after_s: float | None = 1.0
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class Unimplemented(ImageMeshError):
    """The operation exists in the contract but is not implemented by this server."""

    code_name = "UNIMPLEMENTED"
    default_reason = "UNIMPLEMENTED"
