"""Client sub-commands of ``runyard``: send, chat, sessions."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from runyard._proto.v1 import common_pb2, gateway_pb2
from runyard.cli.demo_tools import DEMO_TOOLS
from runyard.cli.demo_tools import answer as demo_answer
from runyard.cli.prompt import LinePrompt
from runyard.client import Client
from runyard.common import tls
from runyard.common.config import load_config
from runyard.common.errors import RunyardError

__all__ = ["CHAT_HELP", "Progress", "add_parsers", "describe_error"]

_STRATEGIES = {
    "enqueue": common_pb2.MULTITASK_STRATEGY_ENQUEUE,
    "reject": common_pb2.MULTITASK_STRATEGY_REJECT,
    "interrupt": common_pb2.MULTITASK_STRATEGY_INTERRUPT,
    "collect": common_pb2.MULTITASK_STRATEGY_COLLECT,
}
_REASONS = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}


def _address(args: argparse.Namespace) -> str:
    return str(getattr(args, "_address", "") or args.gateway or "")


def _client(args: argparse.Namespace) -> Client:
    config = load_config(args.config)
    address = args.gateway or config.endpoints.gateway
    args._address = address
    api_key = args.api_key or os.environ.get("RUNYARD_API_KEY", "")
    # The gateway's CA (and a client certificate) when [tls] is on.
    return Client(address, api_key=api_key, tls=tls.load(config))


def _transport_problem(message: str) -> str:
    """A short reading of gRPC's connection error text."""
    lowered = message.lower()
    for needle, meaning in (
        ("connection refused", "connection refused"),
        ("dns resolution failed", "the host name does not resolve"),
        ("name or service not known", "the host name does not resolve"),
        ("timeout occurred", "the connection timed out"),
        ("deadline exceeded", "no answer in time"),
        ("ssl", "the TLS handshake failed"),
        ("handshake", "the TLS handshake failed"),
    ):
        if needle in lowered:
            return meaning
    return message


def describe_error(exc: RunyardError, address: str = "") -> str:
    """What the CLI prints for a failed call: ``error: CODE REASON: message``
    (the reason only when it says more than the code), and for the errors a
    user can fix, the next step on a second line."""
    code = exc.code
    where = f" at {address}" if address else ""
    if code == grpc.StatusCode.UNAVAILABLE and exc.reason in ("", "UNAVAILABLE"):
        return (
            f"error: cannot reach the runyard gateway{where} ({_transport_problem(exc.message)}).\n"
            "  Is runyard running? Start it with `runyard up`, or point --gateway (or endpoints.gateway) "
            "at a running gateway."
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and exc.reason in ("", "DEADLINE_EXCEEDED"):
        return f"error: the runyard gateway{where} did not answer in time ({exc.message}); try again"
    head = code.name if exc.reason in ("", code.name) else f"{code.name} {exc.reason}"
    text = f"error: {head}: {exc.message}"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        text += (
            "\n  Pass --api-key KEY or set RUNYARD_API_KEY "
            "(an admin creates keys with `runyard keys create`)."
        )
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        text += "\n  Use an API key with that scope (`runyard keys create --scope ...`)."
    return text


def _error(exc: RunyardError, address: str = "") -> int:
    print(describe_error(exc, address), file=sys.stderr)
    return 1


class Progress:
    """Run progress on stderr (queued, started on a model) when stderr is a
    terminal: one status line, rewritten in place and erased when the answer
    starts. Silent when stderr is not a terminal (piped, redirected)."""

    def __init__(self, stream: TextIO = sys.stderr):
        self.stream = stream
        self.enabled = stream.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write(f"\r\x1b[2K\x1b[2m{text}\x1b[0m")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False

    def event(self, event: common_pb2.RunEvent) -> None:
        kind = event.WhichOneof("event")
        if kind == "queued":
            ahead = event.queued.position
            self.show(
                "queued"
                + (f" ({ahead} run{'s' if ahead != 1 else ''} ahead on this session)" if ahead else "")
            )
        elif kind == "started":
            started = event.started
            model = started.model or "the agent's model"
            self.show(f"started on {model}" + (f" (worker {started.worker_id})" if started.worker_id else ""))
        elif kind == "tool_call":
            self.show(f"calling tool {event.tool_call.call.name}")


@dataclass
class RunCursor:
    """Where a printed run stands (for JoinRun after a drain, CancelRun on Ctrl-C)."""

    run_id: str = ""
    last_seq: int = 0


async def _print_run(
    client: Client,
    events: Any,
    *,
    show_timing: bool,
    out: Any = sys.stdout,
    cursor: RunCursor | None = None,
    demo_tools: bool = False,
) -> int:
    """Print a run's stream; resumes with JoinRun if the gateway drains. Returns the exit code.

    With ``demo_tools`` the run's client tool calls (``requires_action``)
    are answered here (:mod:`runyard.cli.demo_tools`), each shown on stderr."""
    started = time.perf_counter()
    first_token: float | None = None
    cursor = cursor if cursor is not None else RunCursor()
    progress = Progress()
    resuming = False  # a requires_action was answered: the next `started` continues the run
    try:
        while True:
            try:
                async for event in events:
                    cursor.run_id, cursor.last_seq = event.run_id, event.seq
                    kind = event.WhichOneof("event")
                    if kind in ("queued", "started", "tool_call") and first_token is None:
                        progress.event(event)
                    if kind == "text_delta":
                        if first_token is None:
                            first_token = time.perf_counter() - started
                            progress.clear()
                        out.write(event.text_delta.text)
                        out.flush()
                    elif kind == "model_failover":
                        # On a terminal every failover is shown; piped, only one that restarts
                        # an answer already printed (the text before it is to be discarded).
                        failover = event.model_failover
                        if progress.enabled or failover.restart_output:
                            progress.clear()
                            note = (
                                f"[failover {failover.from_model} -> {failover.to_model}: "
                                f"{_REASONS.get(failover.reason, '?')}"
                            )
                            if failover.restart_output:
                                note += "; restarting the answer"
                            print(
                                f"{note}]" if first_token is None else f"\n{note}]",
                                file=sys.stderr,
                                flush=True,
                            )
                    elif (
                        kind == "started"
                        and event.started.attempt > 1
                        and not (resuming and event.started.resumed)
                    ):
                        progress.clear()
                        print(
                            f"\n[run restarted, attempt {event.started.attempt}]", file=sys.stderr, flush=True
                        )
                    elif kind == "started":
                        resuming = False
                    elif kind == "requires_action":
                        progress.clear()
                        await _answer_tools(client, event, demo_tools)
                        resuming = True
                    elif kind == "completed":
                        progress.clear()
                        out.write("\n")
                        out.flush()
                        if show_timing and first_token is not None:
                            total = time.perf_counter() - started
                            print(
                                f"[{event.completed.model}; first token {first_token * 1000:.1f} ms, "
                                f"total {total * 1000:.1f} ms]",
                                file=sys.stderr,
                            )
                        return 0
                    elif kind == "failed":
                        progress.clear()
                        error = event.failed.error
                        print(f"\nerror: {error.code} {error.reason}: {error.message}", file=sys.stderr)
                        return 1
                    elif kind == "cancelled":
                        progress.clear()
                        print(f"\n[cancelled: {event.cancelled.reason}]", file=sys.stderr)
                        return 1
                return 0
            except RunyardError as exc:
                progress.clear()
                if exc.reason == "DRAINING" and cursor.run_id:
                    print("\n[gateway restarting; resuming]", file=sys.stderr)
                    await asyncio.sleep(exc.retry_after_s or 0.5)
                    events = client.join(cursor.run_id, cursor.last_seq)
                    continue
                return _error(exc, client.address)
    finally:
        progress.clear()


async def _answer_tools(client: Client, event: common_pb2.RunEvent, demo_tools: bool) -> None:
    """Answer a run's ``requires_action`` with the demo tools (shown on stderr)."""
    calls = list(event.requires_action.tool_calls)
    if not demo_tools:
        print(
            f"\n[the run waits for client tool results: {', '.join(c.name for c in calls)}]", file=sys.stderr
        )
        return
    outputs = [demo_answer(call) for call in calls]
    for call, output in zip(calls, outputs, strict=True):
        mark = " (error)" if output.is_error else ""
        print(
            f"[tool {call.name} {call.arguments_json or '{}'} -> {output.content}{mark}]",
            file=sys.stderr,
            flush=True,
        )
    await client.submit_tool_results(event.run_id, outputs)


async def _send(args: argparse.Namespace) -> int:
    text = " ".join(args.text) if args.text else sys.stdin.read()
    async with _client(args) as client:
        events = client.send(
            args.session,
            text,
            agent_id=args.agent or "",
            idempotency_key=args.idempotency_key or "",
            strategy=_STRATEGIES[args.strategy],
            model=args.model or "",
            client_tools=DEMO_TOOLS if args.demo_tools else (),
        )
        return await _print_run(client, events, show_timing=args.timing, demo_tools=args.demo_tools)


# ---------------------------------------------------------------- chat

CHAT_HELP = """commands (anything else is sent to the agent; start a message with // to send a leading /):
  /help             this list
  /reset            start the session over (a new session id; the transcript is kept or purged per config)
  /history          the session's transcript so far
  /model [NAME]     use provider/model NAME for the next messages; /model alone shows it, /model - resets
  /agent [ID]       talk to agent ID from now on; /agent alone shows it
  /session [KEY]    switch to session KEY; /session alone shows it
  /exit, /quit      leave (also Ctrl-D, or Ctrl-C at the prompt)
Ctrl-C while an answer streams cancels that run and returns to the prompt."""


@dataclass
class ChatState:
    """What the next message of ``runyard chat`` uses."""

    session: str
    agent: str = ""
    model: str = ""


async def _reachable(client: Client, session: str) -> None:
    """A cheap call before the first prompt: raises the RunyardError that
    ``send`` would meet (no gateway, a bad API key), so it shows at once."""
    try:
        await client.unary("GetSession", gateway_pb2.GetSessionRequest(session_key=session), timeout_s=10.0)
    except RunyardError as exc:
        if exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED):
            raise


async def _print_history(client: Client, session_key: str) -> None:
    token = ""
    shown = 0
    while True:
        page = await client.unary(
            "GetMessages",
            gateway_pb2.GetMessagesRequest(session_key=session_key, page_size=200, page_token=token),
        )
        if page.summary and not token:  # type: ignore[attr-defined]
            print(f"[summary] {page.summary}")  # type: ignore[attr-defined]
        for message in page.messages:  # type: ignore[attr-defined]
            role = common_pb2.Role.Name(message.role).removeprefix("ROLE_").lower()
            print(f"{role:>9}: {message.content}")
            shown += 1
        token = page.next_page_token  # type: ignore[attr-defined]
        if not token:
            break
    if not shown:
        print("[no messages yet]", file=sys.stderr)


async def _chat_command(client: Client, state: ChatState, line: str) -> bool:
    """Run one /command locally; False means leave."""
    command, _, argument = line.partition(" ")
    argument = argument.strip()
    if command in ("/exit", "/quit"):
        return False
    if command in ("/help", "/?"):
        print(CHAT_HELP, file=sys.stderr)
    elif command == "/reset":
        await client.unary("ResetSession", gateway_pb2.ResetSessionRequest(session_key=state.session))
        print("[session reset]", file=sys.stderr)
    elif command == "/history":
        await _print_history(client, state.session)
    elif command == "/model":
        if argument:
            state.model = "" if argument in ("-", "default") else argument
        print(f"[model: {state.model or 'the agent’s own chain'}]", file=sys.stderr)
    elif command == "/agent":
        if argument:
            state.agent = "" if argument in ("-", "default") else argument
        print(f"[agent: {state.agent or 'the default agent'}]", file=sys.stderr)
    elif command == "/session":
        if argument:
            state.session = argument
        print(f"[session: {state.session}]", file=sys.stderr)
    else:
        print(
            f"[unknown command {command}; /help lists them, // sends a message starting with /]",
            file=sys.stderr,
        )
    return True


def _chat(args: argparse.Namespace) -> int:
    """Interactive chat. The prompt is read on the main thread by
    :class:`LinePrompt` (so Ctrl-C leaves at once); each turn runs on one
    asyncio runner that keeps the channel open between turns."""
    state = ChatState(session=args.session, agent=args.agent or "", model=args.model or "")
    prompt = LinePrompt()
    with asyncio.Runner() as runner:
        client = _client(args)
        try:
            try:
                runner.run(_reachable(client, state.session))
            except RunyardError as exc:
                return _error(exc, client.address)
            print(
                f"chatting on session {state.session!r}; /help lists commands, /exit (or Ctrl-D) leaves",
                file=sys.stderr,
            )
            while True:
                try:
                    line = prompt.read("> ").strip()
                except EOFError:
                    return 0
                except KeyboardInterrupt:
                    print(file=sys.stderr)
                    return 130
                if not line:
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    try:
                        if not runner.run(_chat_command(client, state, line)):
                            return 0
                    except RunyardError as exc:
                        _error(exc, client.address)
                    except KeyboardInterrupt:
                        print(file=sys.stderr)
                    continue
                text = line[1:] if line.startswith("//") else line
                cursor = RunCursor()
                events = client.send(
                    state.session,
                    text,
                    agent_id=state.agent,
                    model=state.model,
                    client_tools=DEMO_TOOLS if args.demo_tools else (),
                )
                try:
                    runner.run(
                        _print_run(
                            client, events, show_timing=False, cursor=cursor, demo_tools=args.demo_tools
                        )
                    )
                except KeyboardInterrupt:
                    if cursor.run_id:
                        with contextlib.suppress(RunyardError):
                            runner.run(
                                client.unary(
                                    "CancelRun",
                                    gateway_pb2.CancelRunRequest(
                                        run_id=cursor.run_id, reason="cancelled at the terminal"
                                    ),
                                    timeout_s=5.0,
                                )
                            )
                    print("\n[cancelled]", file=sys.stderr)
        finally:
            runner.run(client.close())


# ---------------------------------------------------------------- sessions

_SESSION_COLUMNS = f"{'KEY':<32} {'SESSION':<36}  {'AGENT':<12} {'MESSAGES':>9}  {'CREATED':<19}  STATE"


def _session_state(session: common_pb2.Session) -> str:
    if session.current:
        return "current"
    return common_pb2.SessionEndReason.Name(session.end_reason).removeprefix("SESSION_END_REASON_").lower()


def _format_session(session: common_pb2.Session) -> str:
    created = session.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    return (
        f"{session.key:<32} {session.id:<36}  {session.agent_id:<12} {session.message_count:>5} msgs  "
        f"{created}  {_session_state(session)}"
    )


def _session_json(session: common_pb2.Session) -> dict[str, Any]:
    data = json_format.MessageToDict(session, preserving_proto_field_name=True)
    data["state"] = _session_state(session)
    return data


async def _sessions(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        try:
            if args.sessions_command == "list":
                token, found = "", []
                header = not args.json and not args.no_header
                while True:
                    page = await client.unary(
                        "ListSessions",
                        gateway_pb2.ListSessionsRequest(
                            agent_id=args.agent or "", include_ended=args.all, page_size=200, page_token=token
                        ),
                    )
                    for session in page.sessions:  # type: ignore[attr-defined]
                        if args.json:
                            found.append(_session_json(session))
                            continue
                        if header:
                            print(_SESSION_COLUMNS)
                            header = False
                        print(_format_session(session))
                        found.append(session)
                    token = page.next_page_token  # type: ignore[attr-defined]
                    if not token:
                        break
                if args.json:
                    print(json.dumps(found, indent=2))
                elif not found:
                    print(
                        "no sessions" + ("" if args.all else " (--all includes ended ones)"), file=sys.stderr
                    )
            elif args.sessions_command == "show":
                reply = await client.unary("GetSession", gateway_pb2.GetSessionRequest(session_key=args.key))
                print(_format_session(reply.session))  # type: ignore[attr-defined]
                await _print_history(client, args.key)
            elif args.sessions_command == "reset":
                reply = await client.unary(
                    "ResetSession", gateway_pb2.ResetSessionRequest(session_key=args.key)
                )
                print(f"session {args.key!r} reset: {reply.previous_session_id} -> {reply.session.id}")  # type: ignore[attr-defined]
            elif args.sessions_command == "delete":
                reply = await client.unary(
                    "DeleteSession", gateway_pb2.DeleteSessionRequest(session_key=args.key)
                )
                print(f"session {reply.session_id} deleted")  # type: ignore[attr-defined]
        except RunyardError as exc:
            return _error(exc, client.address)
    return 0


_DEMO_TOOLS_HELP = (
    "offer the agent two client-side tools answered on this machine, clock and calculator, "
    "and show each call and result"
)


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
    send.add_argument(
        "--strategy",
        choices=sorted(_STRATEGIES),
        default="enqueue",
        help="what to do while the session has an active run",
    )
    send.add_argument(
        "--model",
        metavar="PROVIDER/MODEL",
        help="use this model instead of the agent's primary (its fallbacks still apply)",
    )
    send.add_argument("--timing", action="store_true", help="print time to first token and total time")
    send.add_argument("--demo-tools", action="store_true", help=_DEMO_TOOLS_HELP)
    send.add_argument("text", nargs="*", help="the message (default: read stdin)")
    send.set_defaults(func=lambda a: asyncio.run(_send(a)))

    chat = sub.add_parser("chat", help="interactive chat on a session")
    common(chat)
    chat.add_argument("--session", required=True, help="session key")
    chat.add_argument("--agent", help="agent id (default: the default agent)")
    chat.add_argument("--model", metavar="PROVIDER/MODEL", help="model to use (change it with /model)")
    chat.add_argument("--demo-tools", action="store_true", help=_DEMO_TOOLS_HELP)
    chat.set_defaults(func=_chat)

    sessions = sub.add_parser("sessions", help="list, show, reset or delete sessions")
    common(sessions)
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    lst = ssub.add_parser("list", help="list sessions")
    lst.add_argument("--agent")
    lst.add_argument("--all", action="store_true", help="include ended sessions")
    lst.add_argument("--json", action="store_true", help="a JSON array of sessions (proto field names)")
    lst.add_argument("--no-header", action="store_true", help="leave out the column header")
    for name, help_text in (
        ("show", "show a session and its transcript"),
        ("reset", "start the key over"),
        ("delete", "delete a session"),
    ):
        p = ssub.add_parser(name, help=help_text)
        p.add_argument("key", help="session key")
    sessions.set_defaults(func=lambda a: asyncio.run(_sessions(a)))
    from runyard.cli.sessions_commands import add_parsers as add_operator_parsers  # prune, shutdown-mode

    add_operator_parsers(ssub)
