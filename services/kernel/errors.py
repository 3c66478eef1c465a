"""Named domain errors, each mapped one-to-one to a gRPC status code and a reason.

A handler raises one of these; the rpc bootstrap turns it into a status with a
``google.rpc.ErrorInfo`` detail (reason + the offending field), so a platform's code can act on
``reason`` without parsing text. Messages never carry personal data.
"""

from __future__ import annotations

import grpc

ERROR_DOMAIN = "subsidy.pingshan.gov"


class DomainError(Exception):
    """Base of every error a caller may see; subclasses fix the status code."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, reason: str, message: str, *, field: str = "", **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = dict(metadata)
        if field:
            self.metadata["field"] = field


class InvalidArgument(DomainError):
    """The request itself is malformed: a field is missing, of the wrong shape or out of range."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(DomainError):
    """Well-formed, but the system's state does not allow it (e.g. merchant not approved)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(DomainError):
    """A budget, quota or per-person limit is used up."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class AlreadyExists(DomainError):
    """The idempotency key was used before with a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Aborted(DomainError):
    """A concurrent change got there first; nothing was written and the call may be retried."""

    code = grpc.StatusCode.ABORTED


def concurrent_update() -> Aborted:
    return Aborted(
        "CONCURRENT_UPDATE", "the data changed while this call ran; nothing was written: retry"
    )


class Unavailable(DomainError):
    """A dependency (another service, Vault, the identity authority) did not answer."""

    code = grpc.StatusCode.UNAVAILABLE


class WrongExpectedVersion(Exception):
    """The stream moved on since the caller read it; nothing was appended (raised by
    services.kernel.eventstore, which re-exports it; defined here so that what maps it, the
    gRPC bootstrap, does not import the event store and SQLAlchemy into every command)."""

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(f"stream {stream_id}: expected version {expected}, found {actual}")
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual
