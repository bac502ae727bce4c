"""Internal gRPC clients: channels, deadline propagation, error mapping.

A service process reaches the others through :class:`InternalChannels`: the
TLS settings and the internal secret its composition root was given (see
:mod:`runyard.common.lifecycle`), passed explicitly to whatever opens channels.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from runyard.common import auth, tracing
from runyard.common.channels import open_channel
from runyard.common.client_metrics import client_metrics_interceptors
from runyard.common.errors import from_rpc_error
from runyard.common.grpctypes import ServicerContext
from runyard.common.tls import TlsSettings

__all__ = ["DEADLINE_MARGIN_S", "InternalChannels", "call", "downstream_timeout", "internal_channel"]

T = TypeVar("T")

#: Time kept back from an incoming deadline for our own work after a downstream call.
DEADLINE_MARGIN_S = 0.05
#: Default gRPC max send/receive message size of an internal channel (bytes).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def internal_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TlsSettings | None = None,
    secret: str = "",
) -> grpc.aio.Channel:
    """A channel to another runyard service (:func:`runyard.common.channels.open_channel`)
    whose every call is counted in the ``grpc_client_*`` metrics, traced with
    tracing on, and carries the internal secret when one is given.

    Args:
        address: ``host:port`` of the service.
        max_message_bytes: gRPC max send/receive message size.
        tls: TLS (mutual, with the client certificate); None = plaintext.
        secret: the internal secret added to every call that does not carry
            one (``x-runyard-internal``); "" = none (callers that send it in
            their own call metadata, such as the CLI).
    """
    # Tracing interceptors (none when tracing is off) put `traceparent` in the call's metadata.
    interceptors = [
        *client_metrics_interceptors(),
        *tracing.client_interceptors(),
        *auth.credential_interceptors(secret),
    ]
    return open_channel(
        address,
        tls=tls,
        max_message_bytes=max_message_bytes,
        interceptors=interceptors,
    )


@dataclass(frozen=True, slots=True)
class InternalChannels:
    """How a service process reaches the other services: the TLS settings and
    the internal secret every channel it opens uses.

    Built once by :func:`runyard.common.lifecycle.run_service` and passed to
    the parts that open channels of their own (the worker, the gateway's
    event relay); holds no channel itself.

    Attributes:
        tls: TLS settings (:func:`runyard.common.tls.load`); None = plaintext.
        secret: the internal secret (``auth.internal_secret``); "" = none.
    """

    tls: TlsSettings | None
    secret: str

    def open(self, address: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> grpc.aio.Channel:
        """A new :func:`internal_channel` to ``address`` (``host:port``); the caller closes it."""
        return internal_channel(
            address, max_message_bytes=max_message_bytes, tls=self.tls, secret=self.secret
        )


def downstream_timeout(context: ServicerContext | None, default_s: float | None = None) -> float | None:
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
