"""Internal gRPC clients: channels, deadline propagation, error mapping."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from runyard.common import auth, tls, tracing
from runyard.common.client_metrics import client_metrics_interceptors
from runyard.common.errors import from_rpc_error
from runyard.common.server import grpc_options

__all__ = ["DEADLINE_MARGIN_S", "call", "downstream_timeout", "internal_channel"]

T = TypeVar("T")

#: Time kept back from an incoming deadline for our own work after a downstream call.
DEADLINE_MARGIN_S = 0.05


#: A peer that was down (restarting, or not up yet when this process started)
#: is retried within 0.1-2 s instead of gRPC's default 1-120 s backoff, during
#: which every call on the channel would fail at once with UNAVAILABLE.
_RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]


def internal_channel(
    address: str, *, max_message_bytes: int = 16 * 1024 * 1024, credential: bool = True
) -> grpc.aio.Channel:
    """A channel to another runyard service: TLS (mutual, with this process's
    client certificate) when ``[tls]`` is enabled, else plaintext; every call on it
    is counted in the ``grpc_client_*`` metrics, traced with tracing on, and, with
    ``credential``, carries this process's internal secret
    (:func:`runyard.common.auth.configure`)."""
    options = grpc_options(max_message_bytes) + tls.channel_options() + _RECONNECT_OPTIONS
    credentials = tls.channel_credentials()
    # Tracing interceptors (none when tracing is off) put `traceparent` in the call's metadata.
    interceptors = [
        *client_metrics_interceptors(),
        *tracing.client_interceptors(),
        *(auth.credential_interceptors() if credential else []),
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def downstream_timeout(context: grpc.aio.ServicerContext | None, default_s: float | None = None) -> float | None:
    """Timeout for a downstream call: the caller's remaining deadline minus a
    margin, else ``default_s``."""
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return default_s
    budget = max(remaining - DEADLINE_MARGIN_S, 0.001)
    return budget if default_s is None else min(budget, default_s)


async def call(awaitable: Awaitable[T]) -> T:
    """Await a unary call; a gRPC failure becomes the :class:`RunyardError` the
    callee raised (same code, reason and metadata)."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None

