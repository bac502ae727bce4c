"""Operator sub-commands of ``runyard sessions`` that talk to the sessions
service directly (with the internal credential from the configuration):

* ``runyard sessions prune [--dry-run] [--org ORG]``: one maintenance pass
  now (``SessionService/PruneSessions``), printing every session that goes
  (or would go) as it happens, progress on stderr, and the totals;
* ``runyard sessions shutdown-mode {shutdown,restart}``: how the instance ends
  its active sessions when it stops (``SessionService/SetShutdownMode``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, TextIO

import grpc

from runyard._proto.v1 import sessions_pb2, sessions_pb2_grpc
from runyard.common import tls
from runyard.common.auth import internal_metadata
from runyard.common.clients import internal_channel
from runyard.common.config import Config, load_config
from runyard.common.errors import RunyardError, from_rpc_error

__all__ = ["add_parsers", "prune"]

_REASONS = {sessions_pb2.PRUNE_REASON_IDLE: "idle", sessions_pb2.PRUNE_REASON_CAP: "cap"}


def _target(args: argparse.Namespace) -> tuple[Config, str]:
    config = load_config(args.config)
    return config, args.sessions or config.endpoints.sessions


async def prune(
    stub: sessions_pb2_grpc.SessionServiceStub,
    metadata: Any,
    *,
    dry_run: bool,
    org_id: str = "",
    quiet: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> sessions_pb2.PruneStats:
    """Run one maintenance pass and print it; returns the totals.

    Raises:
        RunyardError: the call failed.
    """
    verb = "would prune" if dry_run else "pruned"
    stats = sessions_pb2.PruneStats()
    try:
        async for batch in stub.PruneSessions(
            sessions_pb2.PruneSessionsRequest(dry_run=dry_run, org_id=org_id), metadata=metadata
        ):
            if not quiet:
                for item in batch.sessions:
                    last = item.last_active_time.ToDatetime().strftime("%Y-%m-%d %H:%M")
                    out.write(
                        f"{verb}  {_REASONS.get(item.reason, '?'):<4}  {item.key:<32} {item.session_id}  "
                        f"{item.org_id}/{item.agent_id}  {item.message_count} msgs, last active {last}\n"
                    )
                out.flush()
            stats = batch.stats
            if batch.sessions:
                print(
                    f"[{stats.sessions_idle} idle + {stats.sessions_capped} capped so far]",
                    file=err,
                    flush=True,
                )
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None
    archived = stats.snapshots_archived
    old_snapshots = (
        f"{archived} old snapshot(s) archived"
        if archived
        else f"{stats.snapshots_dropped} old snapshot(s) dropped"
    )
    pending, events = stats.pending_snapshots_dropped, stats.events_trimmed
    if dry_run:
        would = old_snapshots.replace(" archived", " would be archived").replace(
            " dropped", " would be dropped"
        )
        print(
            f"dry run: would prune {stats.sessions_idle} idle and {stats.sessions_capped} capped session(s); "
            f"{would}, "
            f"{pending} stale pending snapshot(s) and {events} old event(s) would be removed; nothing was "
            "changed",
            file=out,
        )
    else:
        print(
            f"pruned {stats.sessions_idle} idle and {stats.sessions_capped} capped session(s); "
            f"{old_snapshots}, "
            f"{pending} stale pending snapshot(s) and {events} old event(s) removed",
            file=out,
        )
    return stats


async def _prune(args: argparse.Namespace) -> int:
    config, address = _target(args)
    async with internal_channel(address, tls=tls.load(config)) as channel:
        try:
            await prune(
                sessions_pb2_grpc.SessionServiceStub(channel),
                internal_metadata(config.auth.internal_secret),
                dry_run=args.dry_run,
                org_id=args.org or "",
                quiet=args.quiet,
            )
        except RunyardError as exc:
            print(f"error: {exc.code.name} {exc.reason}: {exc.message}", file=sys.stderr)
            return 1
    return 0


async def _shutdown_mode(args: argparse.Namespace) -> int:
    config, address = _target(args)
    mode = (
        sessions_pb2.SHUTDOWN_MODE_RESTART if args.mode == "restart" else sessions_pb2.SHUTDOWN_MODE_SHUTDOWN
    )
    async with internal_channel(address, tls=tls.load(config)) as channel:
        try:
            reply = await sessions_pb2_grpc.SessionServiceStub(channel).SetShutdownMode(
                sessions_pb2.SetShutdownModeRequest(mode=mode),
                metadata=internal_metadata(config.auth.internal_secret),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            print(f"error: {error.code.name} {error.reason}: {error.message}", file=sys.stderr)
            return 1
    name = sessions_pb2.ShutdownMode.Name(reply.mode).removeprefix("SHUTDOWN_MODE_")
    print(f"sessions instance {reply.instance_id}: active sessions will end with {name} when it stops")
    return 0


def add_parsers(ssub: Any) -> None:
    """Add ``prune`` and ``shutdown-mode`` to the ``runyard sessions`` sub-parsers."""
    prune_parser = ssub.add_parser(
        "prune",
        help="maintenance now: prune idle sessions, cap per agent, trim snapshots (--dry-run shows what "
        "would go)",
    )
    prune_parser.add_argument("--dry-run", action="store_true", help="show what would go; change nothing")
    prune_parser.add_argument("--org", help="only this org (default: every org)")
    prune_parser.add_argument("--quiet", action="store_true", help="print only progress and totals")
    prune_parser.add_argument("--sessions", help="sessions service host:port (default: endpoints.sessions)")
    prune_parser.set_defaults(func=lambda a: asyncio.run(_prune(a)))

    mode = ssub.add_parser(
        "shutdown-mode", help="end active sessions with SHUTDOWN or RESTART when the sessions instance stops"
    )
    mode.add_argument("mode", choices=["shutdown", "restart"])
    mode.add_argument("--sessions", help="sessions service host:port (default: endpoints.sessions)")
    mode.set_defaults(func=lambda a: asyncio.run(_shutdown_mode(a)))
