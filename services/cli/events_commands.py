"""``runyard events``: lifecycle events from the gateway's ``WatchEvents``.

Prints one line per event (``--json`` for one JSON object per line, the
proto3 JSON form of ``LifecycleEvent``). Without ``--follow`` it prints the
retained events after ``--after`` and stops once none arrived for
``--idle-exit-s`` seconds; with ``--follow`` it keeps tailing and, when the
gateway restarts, reconnects and resumes after the last id it printed, so
nothing is missed or printed twice.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from tenacity import stop_after_delay, wait_exponential

from runyard._proto.v1 import common_pb2, gateway_pb2
from runyard.cli.client_commands import describe_error
from runyard.client import Client
from runyard.common import tls
from runyard.common.config import LIFECYCLE_EVENT_TYPES, load_config
from runyard.common.errors import RunyardError, from_rpc_error
from runyard.common.faults import retry_after_first
from runyard.common.hooks import SessionCompacted, SessionEnd, SessionStart, from_proto

__all__ = ["add_parsers", "describe", "watch"]

_RECONNECT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def describe(event: common_pb2.LifecycleEvent) -> str:
    """One human-readable line for an event."""
    typed = from_proto(event)
    when = typed.time.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    parts = [f"{event.id:>8}", when, f"{event.type:<17}"]
    if event.session_key or event.session_id:
        parts.append(f"{event.session_key or '-'} ({event.session_id or '-'})")
    if event.run_id:
        parts.append(f"run {event.run_id}")
    if isinstance(typed, SessionStart):
        parts.append(
            typed.reason + (f" from {typed.resumed_from_session_id}" if typed.resumed_from_session_id else "")
        )
    elif isinstance(typed, SessionEnd):
        detail = f"{typed.reason} after {typed.duration_ms} ms, {typed.message_count} msgs"
        if typed.next_session_id:
            detail += f", next {typed.next_session_id}"
        parts.append(detail)
    elif isinstance(typed, SessionCompacted):
        parts.append(f"{typed.summarized_message_count} summarised, {typed.kept_message_count} kept")
    else:
        kind = event.WhichOneof("data")
        if kind == "run":
            run = event.run
            status = common_pb2.RunStatus.Name(run.status).removeprefix("RUN_STATUS_")
            detail = status + (f" {run.model}" if run.model else "")
            if run.error.reason:
                detail += f" {run.error.reason}"
            parts.append(detail)
        elif kind == "model":
            parts.append(f"{event.model.from_model} -> {event.model.to_model}")
        elif kind == "service":
            parts.append(f"{event.service.service} {event.service.instance_id} {event.service.mode}".rstrip())
        elif kind == "message":
            parts.append(f"{event.message.length} chars")
        elif kind == "tool":  # tool.called / tool.completed
            tool = event.tool
            detail = f"{tool.name} ({tool.source or 'unoffered'}) {tool.tool_call_id}"
            if event.type == "tool.completed":
                detail += f" {'error' if tool.is_error else 'ok'} in {tool.duration_ms} ms"
            parts.append(detail)
    return "  ".join(parts)


async def watch(
    client: Client,
    *,
    api_key: str = "",
    after: int = 0,
    types: list[str] | None = None,
    follow: bool = True,
    idle_exit_s: float = 1.0,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    max_reconnect_s: float = 30.0,
) -> int:
    """Print events after ``after`` (calls ``WatchEvents`` with ``api_key``); returns the exit code.

    With ``follow`` it reconnects (resuming after the last id printed) when
    the gateway is unavailable, for at most ``max_reconnect_s`` per outage.
    """
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    last = after
    progressed = False  # the current call has printed an event

    async def follow_once() -> int:
        """One WatchEvents call, printing what it reads: 0 when it ends.

        Raises:
            RunyardError: the call failed (the gateway went away, or refused it).
        """
        nonlocal last, progressed
        progressed = False
        call = client.stub.WatchEvents(
            gateway_pb2.WatchEventsRequest(after_id=last, types=types or []), metadata=metadata
        )
        try:
            while True:
                try:
                    event = await (asyncio.wait_for(call.read(), idle_exit_s) if not follow else call.read())
                except TimeoutError:
                    return 0
                if event is grpc.aio.EOF:
                    return 0
                last, progressed = event.id, True
                if as_json:
                    out.write(json.dumps(json_format.MessageToDict(event)) + "\n")
                else:
                    out.write(describe(event) + "\n")
                out.flush()
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()

    def lost(exc: BaseException) -> bool:
        return follow and isinstance(exc, RunyardError) and exc.code in _RECONNECT_CODES

    def announce(error: BaseException | None) -> None:
        reason = error.reason if isinstance(error, RunyardError) else error
        print(f"[gateway unavailable ({reason}); resuming after {last}]", file=sys.stderr)

    while True:
        # One outage: reconnect with backoff (0.2 s doubling up to 2 s) for at
        # most max_reconnect_s; a call that prints events ends it.
        try:
            return await retry_after_first(
                follow_once,
                retry=lambda exc: lost(exc) and not progressed,
                stop=lambda: stop_after_delay(max_reconnect_s),
                wait=wait_exponential(multiplier=0.2, max=2.0),
                before_sleep=lambda state: announce(state.outcome.exception() if state.outcome else None),
            )
        except RunyardError as error:
            if not (progressed and lost(error)):
                print(describe_error(error, client.address), file=sys.stderr)
                return 1
            announce(error)  # lost after events came through: a new outage, reconnecting at once


async def _events(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    address = args.gateway or config.endpoints.gateway
    api_key = args.api_key or os.environ.get("RUNYARD_API_KEY", "")
    async with Client(address, api_key=api_key, tls=tls.load(config)) as client:
        try:
            return await watch(
                client,
                api_key=api_key,
                after=args.after,
                types=args.type,
                follow=args.follow,
                idle_exit_s=args.idle_exit_s,
                as_json=args.json,
            )
        except RunyardError as exc:
            print(describe_error(exc, address), file=sys.stderr)
            return 1


def add_parsers(sub: Any) -> None:
    """Add ``runyard events``."""
    events = sub.add_parser(
        "events", help="print lifecycle events (session.start/end, run.*, ...) from the gateway's WatchEvents"
    )
    events.add_argument("--gateway", help="gateway host:port (default: endpoints.gateway)")
    events.add_argument("--api-key", help="API key with the 'events' scope (default: $RUNYARD_API_KEY)")
    events.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep printing new events; reconnect and resume across gateway restarts",
    )
    events.add_argument(
        "--type",
        action="append",
        choices=LIFECYCLE_EVENT_TYPES,
        metavar="TYPE",
        help="only this event type (repeatable), e.g. session.end",
    )
    events.add_argument(
        "--after", type=int, default=0, metavar="ID", help="start after this event id (default: 0)"
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument(
        "--idle-exit-s",
        type=float,
        default=1.0,
        help="without --follow: stop after this many seconds without an event",
    )
    events.set_defaults(func=lambda a: asyncio.run(_events(a)))
