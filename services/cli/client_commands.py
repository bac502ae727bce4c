"""Client sub-commands of ``runyard``: send, chat, sessions."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

from runyard._proto.v1 import common_pb2, gateway_pb2
from runyard.client import Client
from runyard.common import tls
from runyard.common.config import load_config
from runyard.common.errors import RunyardError

__all__ = ["add_parsers"]

_STRATEGIES = {
    "enqueue": common_pb2.MULTITASK_STRATEGY_ENQUEUE,
    "reject": common_pb2.MULTITASK_STRATEGY_REJECT,
    "interrupt": common_pb2.MULTITASK_STRATEGY_INTERRUPT,
    "collect": common_pb2.MULTITASK_STRATEGY_COLLECT,
}
_REASONS = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}


def _client(args: argparse.Namespace) -> Client:
    config = load_config(args.config)
    tls.configure(config)  # the gateway's CA (and a client certificate) when [tls] is on
    address = args.gateway or config.endpoints.gateway
    return Client(address, api_key=args.api_key or os.environ.get("RUNYARD_API_KEY", ""))


def _error(exc: RunyardError) -> int:
    print(f"error: {exc.code.name} {exc.reason}: {exc.message}", file=sys.stderr)
    return 1


async def _print_run(client: Client, events: Any, *, show_timing: bool, out: Any = sys.stdout) -> int:
    """Print a run's stream; resumes with JoinRun if the gateway drains. Returns the exit code."""
    started = time.perf_counter()
    first_token: float | None = None
    run_id, last_seq = "", 0
    while True:
        try:
            async for event in events:
                run_id, last_seq = event.run_id, event.seq
                kind = event.WhichOneof("event")
                if kind == "text_delta":
                    if first_token is None:
                        first_token = time.perf_counter() - started
                    out.write(event.text_delta.text)
                    out.flush()
                elif kind == "model_failover":
                    failover = event.model_failover
                    note = f"[failover {failover.from_model} -> {failover.to_model}: {_REASONS.get(failover.reason, '?')}"
                    if failover.restart_output:
                        note += "; restarting the answer"
                    print(f"\n{note}]", file=sys.stderr, flush=True)
                elif kind == "started" and event.started.attempt > 1:
                    print(f"\n[run restarted, attempt {event.started.attempt}]", file=sys.stderr, flush=True)
                elif kind == "completed":
                    out.write("\n")
                    if show_timing and first_token is not None:
                        total = time.perf_counter() - started
                        print(
                            f"[{event.completed.model}; first token {first_token * 1000:.1f} ms, "
                            f"total {total * 1000:.1f} ms]",
                            file=sys.stderr,
                        )
                    return 0
                elif kind == "failed":
                    error = event.failed.error
                    print(f"\nerror: {error.code} {error.reason}: {error.message}", file=sys.stderr)
                    return 1
                elif kind == "cancelled":
                    print(f"\n[cancelled: {event.cancelled.reason}]", file=sys.stderr)
                    return 1
            return 0
        except RunyardError as exc:
            if exc.reason == "DRAINING" and run_id:
                print("\n[gateway restarting; resuming]", file=sys.stderr)
                await asyncio.sleep(exc.retry_after_s or 0.5)
                events = client.join(run_id, last_seq)
                continue
            return _error(exc)


async def _send(args: argparse.Namespace) -> int:
    text = " ".join(args.text) if args.text else sys.stdin.read()
    async with _client(args) as client:
        events = client.send(
            args.session,
            text,
            agent_id=args.agent or "",
            idempotency_key=args.idempotency_key or "",
            strategy=_STRATEGIES[args.strategy],
        )
        return await _print_run(client, events, show_timing=args.timing)


async def _chat(args: argparse.Namespace) -> int:
    print(f"chatting on session {args.session!r}; /reset starts over, /exit (or Ctrl-D) leaves", file=sys.stderr)
    async with _client(args) as client:
        while True:
            try:
                line = await asyncio.to_thread(input, "> ")
            except EOFError:
                return 0
            line = line.strip()
            if not line:
                continue
            if line in ("/exit", "/quit"):
                return 0
            if line == "/reset":
                try:
                    await client.unary("ResetSession", gateway_pb2.ResetSessionRequest(session_key=args.session))
                    print("[session reset]", file=sys.stderr)
                except RunyardError as exc:
                    _error(exc)
                continue
            await _print_run(client, client.send(args.session, line, agent_id=args.agent or ""), show_timing=False)


def _format_session(session: common_pb2.Session) -> str:
    created = session.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    state = "current" if session.current else common_pb2.SessionEndReason.Name(session.end_reason).removeprefix(
        "SESSION_END_REASON_"
    ).lower()
    return f"{session.key:<32} {session.id}  {session.agent_id:<12} {session.message_count:>5} msgs  {created}  {state}"


async def _sessions(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        try:
            if args.sessions_command == "list":
                token, shown = "", 0
                while True:
                    page = await client.unary(
                        "ListSessions",
                        gateway_pb2.ListSessionsRequest(
                            agent_id=args.agent or "", include_ended=args.all, page_size=200, page_token=token
                        ),
                    )
                    for session in page.sessions:  # type: ignore[attr-defined]
                        print(_format_session(session))
                        shown += 1
                    token = page.next_page_token  # type: ignore[attr-defined]
                    if not token:
                        break
                if not shown:
                    print("no sessions", file=sys.stderr)
            elif args.sessions_command == "show":
                reply = await client.unary("GetSession", gateway_pb2.GetSessionRequest(session_key=args.key))
                print(_format_session(reply.session))  # type: ignore[attr-defined]
                token = ""
                while True:
                    page = await client.unary(
                        "GetMessages",
                        gateway_pb2.GetMessagesRequest(session_key=args.key, page_size=200, page_token=token),
                    )
                    if page.summary and not token:  # type: ignore[attr-defined]
                        print(f"[summary] {page.summary}")  # type: ignore[attr-defined]
                    for message in page.messages:  # type: ignore[attr-defined]
                        role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
                        print(f"{role:>9}: {message.content}")
                    token = page.next_page_token  # type: ignore[attr-defined]
                    if not token:
                        break
            elif args.sessions_command == "reset":
                reply = await client.unary("ResetSession", gateway_pb2.ResetSessionRequest(session_key=args.key))
                print(f"session {args.key!r} reset: {reply.previous_session_id} -> {reply.session.id}")  # type: ignore[attr-defined]
            elif args.sessions_command == "delete":
                reply = await client.unary("DeleteSession", gateway_pb2.DeleteSessionRequest(session_key=args.key))
                print(f"session {reply.session_id} deleted")  # type: ignore[attr-defined]
        except RunyardError as exc:
            return _error(exc)
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``send``, ``chat`` and ``sessions`` to the ``runyard`` parser."""

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--gateway", help="gateway host:port (default: endpoints.gateway)")
        p.add_argument("--api-key", help="API key (default: $RUNYARD_API_KEY)")

    send = sub.add_parser("send", help="send one message and stream the reply")
    common(send)
    send.add_argument("--session", required=True, help="session key, e.g. demo or telegram:chat:42")
    send.add_argument("--agent", help="agent id (default: the default agent)")
    send.add_argument("--idempotency-key", help="a repeat with the same key returns the same run")
    send.add_argument("--strategy", choices=sorted(_STRATEGIES), default="enqueue",
                      help="what to do while the session has an active run")
    send.add_argument("--timing", action="store_true", help="print time to first token and total time")
    send.add_argument("text", nargs="*", help="the message (default: read stdin)")
    send.set_defaults(func=lambda a: asyncio.run(_send(a)))

    chat = sub.add_parser("chat", help="interactive chat on a session")
    common(chat)
    chat.add_argument("--session", required=True)
    chat.add_argument("--agent")
    chat.set_defaults(func=lambda a: asyncio.run(_chat(a)))

    sessions = sub.add_parser("sessions", help="list, show, reset or delete sessions")
    common(sessions)
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    lst = ssub.add_parser("list", help="list sessions")
    lst.add_argument("--agent")
    lst.add_argument("--all", action="store_true", help="include ended sessions")
    for name, help_text in (("show", "show a session and its transcript"), ("reset", "start the key over"),
                            ("delete", "delete a session")):
        p = ssub.add_parser(name, help=help_text)
        p.add_argument("key", help="session key")
    sessions.set_defaults(func=lambda a: asyncio.run(_sessions(a)))
    from runyard.sessions.cli import add_parsers as add_operator_parsers  # prune, shutdown-mode

    add_operator_parsers(ssub)
