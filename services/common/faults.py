"""Infrastructure faults: which errors are the database or a peer going away,
and what the caller is told about them.

A dropped PostgreSQL connection (``pg_terminate_backend``, a failover, a
restart), a full pool or a serialization conflict is not the caller's fault
and usually goes away within a second: it is reported as UNAVAILABLE with
reason ``DATABASE_UNAVAILABLE`` and a ``RetryInfo``, never as INTERNAL.
:func:`retry_transient` retries such errors (tenacity) for calls that are
safe to repeat; :func:`rpc_idempotent` says which RPCs are, from the
``idempotency_level`` method option declared in ``protos/``.

:func:`infrastructure_error` is the worker's test: an error that says a
dependency (or the network to it) failed, as opposed to the model or the
request. A run that hits one is handed back to the queue, never failed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
    wait_random,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from runyard.common.errors import InvalidArgument, RunyardError, Unavailable, from_rpc_error
from runyard.common.grpctypes import ServicerContext

__all__ = [
    "DATABASE_UNAVAILABLE",
    "INFRASTRUCTURE_REASONS",
    "as_runyard_error",
    "budget_for",
    "infrastructure_error",
    "retry_after_first",
    "retry_transient",
    "rpc_idempotent",
    "transient_database_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff of :func:`retry_transient`: 50 ms doubling up to 1 s, plus up to 50 ms of jitter.
_DATABASE_WAIT = wait_exponential(multiplier=0.05, max=1.0) + wait_random(0, 0.05)

#: ErrorInfo reason of a transient database fault.
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"

#: SQLSTATE classes and codes that are worth a retry: connection exceptions
#: (08), operator intervention (57: admin shutdown, crash shutdown, cannot
#: connect now, query cancelled), insufficient resources (53: too many
#: connections) and transaction rollbacks (40: serialization failure, deadlock).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "53", "40")

#: Peer-reset texts grpc reports with UNKNOWN or INTERNAL when the other side
#: (or the connection to it) died mid-call, rather than a status it sent.
_PEER_RESET_TEXTS = (
    "stream removed",
    "rst_stream",
    "received rst_stream",
    "connection reset",
    "socket closed",
    "broken pipe",
    "goaway",
    "failed to connect",
    "connection refused",
    "endpoint read failed",
    "internal error from core",
)


def transient_database_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a database fault that a retry may get past.

    True for asyncpg's connection-level errors (closed or lost connection,
    ``InterfaceError``), PostgreSQL errors of SQLSTATE classes 08, 40, 53 and
    57, socket errors and a pool acquire that timed out.
    """
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(exc, (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)):
        # "connection is closed", "connection was closed in the middle of operation", ...
        return True
    # Sockets to PostgreSQL (refused, reset, name lookup) and a pool acquire that timed out.
    return isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))


def _unstorable_value(exc: BaseException) -> bool:
    """PostgreSQL refused a value the request carried (a NUL character, an
    integer outside int64): input validation should have caught it first."""
    if isinstance(
        exc,
        (
            asyncpg.exceptions.CharacterNotInRepertoireError,
            asyncpg.exceptions.UntranslatableCharacterError,
            asyncpg.exceptions.NumericValueOutOfRangeError,
        ),
    ):
        return True
    return isinstance(exc, asyncpg.exceptions.DataError) and "out of int64 range" in str(exc)


def as_runyard_error(exc: BaseException) -> RunyardError | None:
    """The status a non-runyard exception should be reported with, or None
    (a bug: INTERNAL, logged with its traceback).

    * transient database faults -> UNAVAILABLE ``DATABASE_UNAVAILABLE``
      (retryable, RetryInfo 0.2 s);
    * a value PostgreSQL cannot store -> INVALID_ARGUMENT ``UNSTORABLE_VALUE``
      (the message never repeats the value).
    """
    if isinstance(exc, RunyardError):
        return exc
    if _unstorable_value(exc):
        log.warning(
            "a request value reached PostgreSQL and was refused (%s); validation missed it",
            type(exc).__name__,
        )
        return InvalidArgument(
            "the request holds a value that cannot be stored (a NUL character or an integer out of range)",
            reason="UNSTORABLE_VALUE",
        )
    if transient_database_error(exc):
        return Unavailable(
            f"the database is unavailable for a moment ({type(exc).__name__}); retry",
            reason=DATABASE_UNAVAILABLE,
            retry_after_s=0.2,
        )
    return None


#: UNAVAILABLE reasons that mean "a service or the database is away for a
#: moment". Other UNAVAILABLE reasons are answers (the router's
#: ALL_MODELS_FAILED / ALL_MODELS_COOLING: the models failed, the run fails).
INFRASTRUCTURE_REASONS = frozenset({"UNAVAILABLE", "DRAINING", DATABASE_UNAVAILABLE})


def infrastructure_error(exc: BaseException) -> bool:
    """Whether a failed call failed because of infrastructure, not the request or the model.

    True for: UNAVAILABLE with reason UNAVAILABLE (no detail: the transport),
    DRAINING (a peer shutting down) or DATABASE_UNAVAILABLE; a call the server
    ended before handling it (CANCELLED without detail); grpc's peer-reset
    reports under UNKNOWN or INTERNAL ("Stream removed", RST_STREAM from a dead
    peer, "Internal error from Core"); and the transient database errors of
    :func:`transient_database_error` raised locally. Not for the router's
    verdicts on models (``ALL_MODELS_FAILED``...) nor deadlines.
    """
    if isinstance(exc, grpc.aio.AioRpcError):
        exc = from_rpc_error(exc)
    if isinstance(exc, RunyardError):
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            return exc.reason in INFRASTRUCTURE_REASONS
        if exc.code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and exc.reason in (
            "UNKNOWN",
            "INTERNAL",
        ):
            lowered = exc.message.lower()
            return any(marker in lowered for marker in _PEER_RESET_TEXTS)
        return False
    return transient_database_error(exc)


async def retry_after_first(
    call: Callable[[], Awaitable[T]],
    *,
    retry: Callable[[BaseException], bool],
    stop: Callable[[], stop_base],
    wait: wait_base,
    before_sleep: Callable[[RetryCallState], None] | None = None,
) -> T:
    """``await call()``, retried through tenacity while it raises an error
    that ``retry`` accepts.

    The first attempt runs before any retry state is built: it is the hot
    path (nearly every call succeeds at once), and tenacity's state is about
    3% of the sessions service's CPU per run. Its failure is the first
    outcome tenacity sees, so the backoff and ``before_sleep`` are the same
    as for an attempt tenacity made. ``stop()`` builds the stop condition at
    that failure: a budget (``stop_after_delay``) counts from it, a deadline
    (``stop_before_delay`` of what is left) stays where it was.

    Raises:
        Whatever ``call`` raises last.
    """
    try:
        return await call()
    except Exception as exc:  # noqa: BLE001 - only what ``retry`` accepts is retried
        if not retry(exc):
            raise
        first: BaseException | None = exc
    async for attempt in AsyncRetrying(
        stop=stop(),
        wait=wait,
        retry=retry_if_exception(retry),
        before_sleep=before_sleep,
        reraise=True,
    ):
        with attempt:
            if first is not None:
                error, first = first, None
                raise error  # the failure of the attempt made above
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover


async def retry_transient(call: Callable[[], Awaitable[T]], *, budget_s: float = 5.0) -> T:
    """``await call()``, retried on transient database errors for at most
    ``budget_s`` seconds from the first failure (exponential backoff from
    50 ms, capped at 1 s, plus jitter; :func:`retry_after_first`). Only for
    calls that are safe to repeat.

    Raises:
        Whatever ``call`` raises last (the caller maps it, see :func:`as_runyard_error`).
    """
    return await retry_after_first(
        call,
        retry=transient_database_error,
        stop=lambda: stop_after_delay(max(budget_s, 0.0)),
        wait=_DATABASE_WAIT,
    )


_IDEMPOTENT: dict[str, bool] = {}


def rpc_idempotent(full_method: str) -> bool:
    """Whether ``/package.Service/Method`` is declared safe to repeat
    (``option idempotency_level = NO_SIDE_EFFECTS`` or ``IDEMPOTENT``) in
    the descriptors loaded so far."""
    known = _IDEMPOTENT.get(full_method)
    if known is not None:
        return known
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{method}")
    except KeyError:
        return False  # not loaded (yet): not remembered
    level = found.GetOptions().idempotency_level
    answer = level in (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)
    _IDEMPOTENT[full_method] = answer
    return answer


def budget_for(context: ServicerContext, default_s: float = 5.0) -> float:
    """Retry budget within the caller's deadline (half of what is left, at most ``default_s``)."""
    remaining = context.time_remaining()
    if remaining is None:
        return default_s
    return max(min(default_s, remaining / 2), 0.0)
