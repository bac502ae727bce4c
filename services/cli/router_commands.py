"""``runyard router status``: every provider / auth profile / model and its state.

Calls ``RouterService/GetProviderStatus`` at ``endpoints.router`` (or
``--router``) with the internal service credential: ``auth.internal_secret``
(``RUNYARD_INTERNAL_SECRET``), else the secret ``runyard up`` generated in
``$RUNYARD_HOME/secrets.json``. Cooldown state is shared by all router
replicas, so any replica gives the same answer.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc
from runyard.cli.status_commands import internal_secret
from runyard.common import tls
from runyard.common.auth import internal_metadata
from runyard.common.clients import call, internal_channel
from runyard.common.config import load_config
from runyard.common.errors import RunyardError

__all__ = ["add_parsers", "format_states"]

_HEALTH = {
    router_pb2.PROVIDER_HEALTH_OK: "ok",
    router_pb2.PROVIDER_HEALTH_COOLING: "cooling",
    router_pb2.PROVIDER_HEALTH_DISABLED: "disabled",
}
_REASONS = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}


def _when(state: router_pb2.ProviderState, now: float) -> str:
    if not state.HasField("until"):
        return ""
    until = state.until.ToNanoseconds() / 1e9
    stamp = dt.datetime.fromtimestamp(until, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    left = until - now
    if left >= 3600:
        return f"{stamp} (in {left / 3600:.1f}h)"
    if left >= 60:
        return f"{stamp} (in {left / 60:.0f}m)"
    return f"{stamp} (in {max(left, 0):.0f}s)"


def format_states(states: list[router_pb2.ProviderState], now: float | None = None) -> str:
    """A fixed-width table, one row per provider / profile / model ("*" = the
    profile as a whole)."""
    now = time.time() if now is None else now
    header = ("PROVIDER", "PROFILE", "MODEL", "STATE", "UNTIL", "LAST REASON", "FAILURES", "LAST MESSAGE")
    rows = [header]
    for state in states:
        rows.append(
            (
                state.provider,
                state.auth_profile,
                state.model or "*",
                _HEALTH.get(state.health, "?"),
                _when(state, now),
                _REASONS.get(state.last_reason, "") if state.last_reason else "",
                str(state.failure_count) if state.failure_count else "",
                state.last_message[:60],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _as_json(states: list[router_pb2.ProviderState]) -> list[dict[str, Any]]:
    out = []
    for state in states:
        out.append(
            {
                "provider": state.provider,
                "auth_profile": state.auth_profile,
                "model": state.model,
                "state": _HEALTH.get(state.health, "unknown"),
                "until": state.until.ToJsonString() if state.HasField("until") else None,
                "last_reason": _REASONS.get(state.last_reason) if state.last_reason else None,
                "last_message": state.last_message,
                "failure_count": state.failure_count,
                "last_failure_time": state.last_failure_time.ToJsonString()
                if state.HasField("last_failure_time")
                else None,
            }
        )
    return out


async def _status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    address = args.router or config.endpoints.router
    metadata = internal_metadata(internal_secret(config))
    async with internal_channel(address, tls=tls.load(config)) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            reply = await call(
                stub.GetProviderStatus(
                    router_pb2.GetProviderStatusRequest(), metadata=metadata, timeout=args.timeout
                )
            )
        except RunyardError as exc:
            print(
                f"error: {exc.code.name} {exc.reason}: {exc.message} (router at {address})", file=sys.stderr
            )
            return 1
    states = list(reply.states)
    if args.json:
        print(json.dumps(_as_json(states), indent=2))
    else:
        print(format_states(states))
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``router status`` to the ``runyard`` parser."""
    router = sub.add_parser("router", help="the model router")
    rsub = router.add_subparsers(dest="router_command", required=True)
    status = rsub.add_parser("status", help="every provider / auth profile / model and its cooldown state")
    status.add_argument("--router", help="router address host:port (default: endpoints.router)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the router")
    status.set_defaults(func=lambda a: asyncio.run(_status(a)))
