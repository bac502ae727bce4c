"""gRPC channel options and channels, for clients (the public client, the
CLI, internal channels) and the matching server options.

A leaf of the client side: it imports grpc, the ``[tls]`` settings and
nothing of the server stack (:mod:`runyard.common.server` imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from runyard.common.tls import TlsSettings, channel_credentials, channel_options

__all__ = [
    "KEEPALIVE_TIMEOUT_MS",
    "KEEPALIVE_TIME_MS",
    "RECONNECT_OPTIONS",
    "grpc_options",
    "grpc_server_options",
    "open_channel",
]

#: Keepalive: clients (and servers) ping an idle connection this often.
KEEPALIVE_TIME_MS = 20_000
#: ... and drop it when the ping is not answered within this.
KEEPALIVE_TIMEOUT_MS = 10_000


def grpc_options(
    max_message_bytes: int = 16 * 1024 * 1024, *, keepalive_time_ms: int = KEEPALIVE_TIME_MS
) -> list[tuple[str, Any]]:
    """Channel options of runyard clients (internal channels, the client library).

    Clients ping every ``keepalive_time_ms`` even with no call open, so a
    dead peer or a silently dropped connection is noticed within
    ``keepalive_time_ms + KEEPALIVE_TIMEOUT_MS``. Servers accept exactly that
    (:func:`grpc_server_options`).
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


def grpc_server_options(
    max_message_bytes: int = 16 * 1024 * 1024, *, keepalive_time_ms: int = KEEPALIVE_TIME_MS
) -> list[tuple[str, Any]]:
    """Server options that agree with :func:`grpc_options`' client keepalive.

    gRPC servers by default accept a ping without data at most every 5
    minutes, and none while no call is open; a client pinging more often gets
    ``GOAWAY ENHANCE_YOUR_CALM too_many_pings`` after two strikes. Here the
    server permits pings without calls and accepts one every
    ``keepalive_time_ms / 2`` (half the clients' period, so jitter never makes
    a strike). Source: gRPC core ``doc/keepalive.md``
    (``GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS``, ``GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS``).
    """
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", max(keepalive_time_ms // 2, 1)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


#: A peer that was down (restarting, or not up yet when this process started)
#: is retried within 0.1-2 s instead of gRPC's default 1-120 s backoff, during
#: which every call on the channel would fail at once with UNAVAILABLE.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 2000)]


def open_channel(
    address: str,
    *,
    tls: TlsSettings | None,
    max_message_bytes: int = 16 * 1024 * 1024,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A channel to ``address`` with runyard's options: keepalive, message
    size, quick reconnects, and TLS (mutual, with the client certificate of
    ``tls``) when ``tls`` is given, else plaintext."""
    options = grpc_options(max_message_bytes) + channel_options(tls) + RECONNECT_OPTIONS
    credentials = channel_credentials(tls)
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=list(interceptors))
    return grpc.aio.insecure_channel(address, options=options, interceptors=list(interceptors))
