"""Internal gRPC clients: channels, deadline propagation, error mapping."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc

from runyard.common import auth, tracing
from runyard.common.channels import open_channel
from runyard.common.client_metrics import client_metrics_interceptors
from runyard.common.errors import from_rpc_error
from runyard.common.tls import PROCESS, TlsSettings, resolve

__all__ = ["DEADLINE_MARGIN_S", "call", "downstream_timeout", "internal_channel"]

T = TypeVar("T")

#: Time kept back from an incoming deadline for our own work after a downstream call.
DEADLINE_MARGIN_S = 0.05


def internal_channel(
    address: str,
    *,
    max_message_bytes: int = 16 * 1024 * 1024,
    credential: bool = True,
    tls: TlsSettings | None | object = PROCESS,
    secret: str | None = None,
) -> grpc.aio.Channel:
    """A channel to another runyard service (:func:`runyard.common.channels.open_channel`)
    whose every call is counted in the ``grpc_client_*`` metrics, traced with
    tracing on, and, with ``credential``, carries the internal secret.

    Args:
        tls: TLS (mutual, with the client certificate); default:
            this process's (:func:`runyard.common.tls.configure`).
        secret: the internal secret; default: this process's
            (:func:`runyard.common.auth.configure`).
    """
    # Tracing interceptors (none when tracing is off) put `traceparent` in the call's metadata.
    interceptors = [
        *client_metrics_interceptors(),
        *tracing.client_interceptors(),
        *(auth.credential_interceptors(secret) if credential else []),
    ]
    return open_channel(
        address,
        tls=resolve(tls),
        max_message_bytes=max_message_bytes,
        interceptors=interceptors,
    )


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

