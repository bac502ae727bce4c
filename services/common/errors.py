"""One error hierarchy, mapped to gRPC status codes and ``google.rpc.Status``.

Servers raise a :class:`RunyardError` subclass; the server interceptor turns it
into a status with a ``google.rpc.Status`` detail holding

* ``google.rpc.ErrorInfo``: ``reason`` (UPPER_SNAKE_CASE), ``domain``
  ``runyard.dev`` and ``metadata`` (``field`` names the offending request
  field when there is one);
* ``google.rpc.BadRequest`` with a field violation, for INVALID_ARGUMENT
  errors that name a field;
* ``google.rpc.RetryInfo`` when waiting helps (``retry_after_s``).

Clients get the same object back with :func:`from_rpc_error`. The detail
format follows https://google.aip.dev/193.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from runyard._proto.v1 import common_pb2

__all__ = [
    "DOMAIN",
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RunyardError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "from_run_error",
]

DOMAIN = "runyard.dev"


class RunyardError(Exception):
    """Base of every error a runyard service reports to a caller.

    Args:
        message: human-readable, names the field or object concerned.
        reason: UPPER_SNAKE_CASE machine-readable reason (defaults per class).
        field: request field at fault (``"text"``, ``"session_key"``), if any.
        retry_after_s: seconds after which a retry may succeed (adds RetryInfo).
        metadata: extra ErrorInfo metadata (string values).
        retryable: whether the same request may succeed later (defaults per class).
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"
    default_retryable = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
        retryable: bool | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.field = field
        self.retry_after_s = retry_after_s
        self.metadata = dict(metadata or {})
        if field:
            self.metadata.setdefault("field", field)
        self.retryable = self.default_retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason}: {self.message})"

    def to_status_proto(self) -> status_pb2.Status:
        """The ``google.rpc.Status`` with ErrorInfo (+ BadRequest, RetryInfo)."""
        details: list[any_pb2.Any] = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        details.append(packed)
        if self.field and self.code == grpc.StatusCode.INVALID_ARGUMENT:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
                ]
            )
            packed = any_pb2.Any()
            packed.Pack(bad)
            details.append(packed)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(max(self.retry_after_s, 0) * 1e9))
            packed = any_pb2.Any()
            packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            details.append(packed)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def to_grpc_status(self) -> grpc.Status:
        """The status object for ``context.abort_with_status``."""
        return rpc_status.to_status(self.to_status_proto())

    def to_run_error(self) -> common_pb2.RunError:
        """The error as carried in a ``RunFailed`` event."""
        error = common_pb2.RunError(
            code=self.code.name,
            reason=self.reason,
            message=self.message,
            retryable=self.retryable,
            metadata=self.metadata,
        )
        reason = self.metadata.get("failover_reason")
        if reason:
            # Value() is typed as a plain int in protobuf's stubs.
            error.failover_reason = cast(
                common_pb2.FailoverReason, common_pb2.FailoverReason.Value(f"FAILOVER_REASON_{reason}")
            )
        return error


class InvalidArgument(RunyardError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(RunyardError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class OutOfRange(RunyardError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class AlreadyExists(RunyardError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(RunyardError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class ResourceExhausted(RunyardError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"
    default_retryable = True


class Unavailable(RunyardError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"
    default_retryable = True


class PermissionDenied(RunyardError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(RunyardError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class DeadlineExceeded(RunyardError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"
    default_retryable = True


class Cancelled(RunyardError):
    code = grpc.StatusCode.CANCELLED
    default_reason = "CANCELLED"


class Unimplemented(RunyardError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


class Internal(RunyardError):
    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[RunyardError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        OutOfRange,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        PermissionDenied,
        Unauthenticated,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Internal,
    )
}


def _error_for(code: grpc.StatusCode) -> type[RunyardError]:
    return _BY_CODE.get(code, Internal if code != grpc.StatusCode.UNKNOWN else RunyardError)


def from_rpc_error(error: grpc.RpcError) -> RunyardError:
    """Rebuild the :class:`RunyardError` a server raised from a client-side error.

    Works for any gRPC error: without a ``google.rpc.Status`` detail the reason
    is the status code's name.

    One exception: CANCELLED without an ``ErrorInfo`` detail becomes
    :class:`Unavailable` (reason UNAVAILABLE). A client-side cancellation
    surfaces as ``asyncio.CancelledError``, never as an ``AioRpcError``, so
    such a status comes from the other side: gRPC core ends the calls that a
    stopping server had accepted but not yet handed to a handler with
    ``CANCELLED "CANCELLED"`` (grpc/grpc#41785). For the caller that is the
    server going away, and the call may be retried on another replica.
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message = error.details() if hasattr(error, "details") else str(error)
    reason = code.name
    metadata: dict[str, str] = {}
    retry_after_s: float | None = None
    try:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
    except (ValueError, AttributeError):
        status = None
    has_info = False
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or reason
                metadata.update(info.metadata)
                has_info = True
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    if code == grpc.StatusCode.CANCELLED and not has_info:
        code, reason = grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"
        message = f"the server ended the call before handling it ({message or 'CANCELLED'}); retry"
    exc = _error_for(code)(
        message or code.name,
        reason=reason,
        field=metadata.get("field"),
        retry_after_s=retry_after_s,
        metadata=metadata,
    )
    exc.code = code
    return exc


def from_run_error(error: common_pb2.RunError) -> RunyardError:
    """The :class:`RunyardError` equivalent of a ``RunError`` message."""
    code = (
        grpc.StatusCode[error.code] if error.code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
    )
    exc = _error_for(code)(
        error.message, reason=error.reason or None, metadata=error.metadata, retryable=error.retryable
    )
    exc.code = code
    return exc
