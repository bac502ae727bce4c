"""Issue 11, against the real services: every hostile input answered with its
status, internal traffic closed by default, run tokens that only the gateway
can mint and that die with their run, and infrastructure faults (dropped
database connections) that never reach the user."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from runyard import RunyardError
from runyard._proto.v1 import admin_pb2, admin_pb2_grpc, tasks_pb2, tasks_pb2_grpc
from runyard.common.auth import RunTokenSigner, internal_metadata, load_private_key
from runyard.common.errors import from_rpc_error
from runyard.gateway.keys import ApiKeyStore
from runyard.v1 import (
    ChatRequest,
    ConnectRequest,
    DeleteSessionRequest,
    GenerateRequest,
    GetMessagesRequest,
    GetRunRequest,
    GetSessionRequest,
    GetTranscriptRequest,
    JoinRunRequest,
    ListRunsRequest,
    ListSessionsRequest,
    Message,
    ResetSessionRequest,
    RouterServiceStub,
    RunPayload,
    SendMessageRequest,
    SessionServiceStub,
    WatchEventsRequest,
    WorkerHello,
    WorkerHubServiceStub,
)
from tests.stack import INTERNAL_SECRET, RUN_TOKEN_PRIVATE_KEY, RUN_TOKEN_PUBLIC_KEY, Stack
from tests.support import ROOT, collect

NUL = "\x00"
LONG_KEY = "k" * 10_000
#: Resident memory a service may use after the whole table (it idles near 80-120 MB).
MAX_RSS_MB = 400


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def make_keys(url: str, names: list[str]) -> dict[str, str]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        store = ApiKeyStore(pool)
        scopes = ["chat", "sessions:read", "sessions:admin", "events"]
        return {name: (await store.create("org-h", name, scopes))[1] for name in names}
    finally:
        await pool.close()


def forged_token(key: object, algorithm: str, **claims: object) -> str:
    body = {
        "iss": "runyard.gateway",
        "aud": "runyard.internal",
        "sub": str(uuid.uuid4()),
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
        "org": "org-h",
        "agt": "default",
        "ses": str(uuid.uuid4()),
        "epo": 1,
    }
    body.update(claims)
    return jwt.encode(body, key, algorithm=algorithm)


async def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, str]:
    """``(code, reason, message)`` of a call that is expected to fail (OK if it does not)."""
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            await collect(result)
        else:
            result = await result
            if hasattr(result, "__aiter__"):
                await collect(result)
    except RunyardError as exc:
        return exc.code, exc.reason, exc.message
    except grpc.aio.AioRpcError as exc:
        error = from_rpc_error(exc)
        return error.code, error.reason, error.message
    return grpc.StatusCode.OK, "", ""


async def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` every other connection to the test's database."""
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


@pytest.mark.timeout(240)
async def test_hostile_input_table_every_item_answered_and_the_stack_stays_healthy(
    stack_factory, migrated_url
):
    keys = await make_keys(migrated_url, ["a", "chatty", "joiner", "after"])
    stack: Stack = await stack_factory(
        {
            "auth": {"anonymous": False},
            "providers": {"echo": {"type": "echo", "echo_delay_ms": 150}},
            "gateway": {
                "rate_limit_rps": 1,
                "rate_limit_burst": 60,
                "max_follows_per_chat": 4,
                "auth_failure_rate_per_s": 0.05,
                "auth_failure_burst": 5,
            },
        }
    ).start()
    async with (
        stack.client(keys["a"]) as a,
        stack.client(keys["chatty"]) as chatty,
        stack.client(keys["joiner"]) as joiner,
    ):
        async with stack.client(keys["after"]) as after:  # verified once: no guess later
            await after.unary("ListSessions", ListSessionsRequest())
        finished = await collect(a.send("table:done", "one two"))
        run_id, session_id = finished[0].run_id, finished[0].session_id
        assert finished[-1].HasField("completed")
        slow = a.send("table:slow", " ".join(["w"] * 60))  # ~9 s of streaming: a running run
        slow_first = await anext(slow)
        # Four more live runs (queued or running) for the joins cap.
        others = [a.send(f"table:slow{n}", " ".join(["w"] * 60)) for n in range(4)]
        live = [slow_first.run_id] + [(await anext(stream)).run_id for stream in others]
        for stream in others:
            await stream.aclose()

        async def chat(client, requests: list[ChatRequest], read: int = 0):
            async def feed():
                for item in requests:
                    yield item
                await asyncio.sleep(30)

            call = client.stub.Chat(feed(), metadata=client._metadata)
            try:
                async for _ in call:
                    pass
            finally:
                call.cancel()

        def send(**fields):
            return lambda: a.send(**{"session_key": "table:nul", "text": "hi", **fields})

        internal_channel = grpc.aio.insecure_channel(stack.gateway_internal_address)
        public_channel = grpc.aio.insecure_channel(stack.gateway_address)
        sessions_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['sessions']}")
        router_channel = grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['router']}")
        internal = internal_metadata(INTERNAL_SECRET)
        signer = RunTokenSigner(RUN_TOKEN_PRIVATE_KEY)
        spent_token = signer.sign(
            org_id="org-h", agent_id="default", session_id=session_id, run_id=run_id, epoch=1
        )

        async def hello():
            yield ConnectRequest(hello=WorkerHello(worker_id="intruder", capacity=1))

        async def nothing():
            # A bidi call to a method the server does not have: sending nothing
            # avoids a race in gRPC's core, where a message written after the
            # server's UNIMPLEMENTED trailers sometimes surfaces as INTERNAL.
            return
            yield

        bad_key = "ryk_zzzzzzzzzzzz_" + "x" * 43
        table: list[tuple[str, Callable[[], Awaitable[object]], grpc.StatusCode, str]] = [
            # 1. Values PostgreSQL cannot store, refused before anything is written.
            ("1 NUL in text", send(text=f"a{NUL}b"), grpc.StatusCode.INVALID_ARGUMENT, "NUL_CHARACTER"),
            (
                "1 NUL in idempotency_key",
                send(idempotency_key=f"i{NUL}"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "NUL_CHARACTER",
            ),
            (
                "1 NUL in a metadata value",
                send(metadata={"m": f"v{NUL}"}),
                grpc.StatusCode.INVALID_ARGUMENT,
                "NUL_CHARACTER",
            ),
            (
                "1 NUL in agent_id",
                send(agent_id=f"x{NUL}"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "NUL_CHARACTER",
            ),
            (
                "1 NUL in a session key (GetSession)",
                lambda: a.unary("GetSession", GetSessionRequest(session_key=f"k{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_SESSION_KEY",
            ),
            (
                "1 NUL in a session key (GetMessages)",
                lambda: a.unary("GetMessages", GetMessagesRequest(session_key=f"k{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_SESSION_KEY",
            ),
            (
                "1 NUL in a session key (ListRuns)",
                lambda: a.unary("ListRuns", ListRunsRequest(session_key=f"k{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_SESSION_KEY",
            ),
            (
                "1 NUL in a session key (ResetSession)",
                lambda: a.unary("ResetSession", ResetSessionRequest(session_key=f"k{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_SESSION_KEY",
            ),
            (
                "1 NUL in a session key (DeleteSession)",
                lambda: a.unary("DeleteSession", DeleteSessionRequest(session_key=f"k{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "INVALID_SESSION_KEY",
            ),
            (
                "1 NUL in agent_id (ListSessions)",
                lambda: a.unary("ListSessions", ListSessionsRequest(agent_id=f"a{NUL}")),
                grpc.StatusCode.INVALID_ARGUMENT,
                "NUL_CHARACTER",
            ),
            # 2. Session keys validated on every read path; the message never echoes the key.
            (
                "2 long key (GetSession)",
                lambda: a.unary("GetSession", GetSessionRequest(session_key=LONG_KEY)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 long key (GetMessages)",
                lambda: a.unary("GetMessages", GetMessagesRequest(session_key=LONG_KEY)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 long key (ListRuns)",
                lambda: a.unary("ListRuns", ListRunsRequest(session_key=LONG_KEY)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 long key (ResetSession)",
                lambda: a.unary("ResetSession", ResetSessionRequest(session_key=LONG_KEY)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 long key (DeleteSession)",
                lambda: a.unary("DeleteSession", DeleteSessionRequest(session_key=LONG_KEY)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 300-char key over the configured 256 (GetSession)",
                lambda: a.unary("GetSession", GetSessionRequest(session_key="k" * 300)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "SESSION_KEY_TOO_LONG",
            ),
            (
                "2 unknown key: NOT_FOUND, short message",
                lambda: a.unary("GetSession", GetSessionRequest(session_key="k" * 256)),
                grpc.StatusCode.NOT_FOUND,
                "SESSION_NOT_FOUND",
            ),
            # 3. Cursors beyond int64.
            (
                "3 JoinRun after_seq > int64",
                lambda: a.join(run_id, after_seq=2**64 - 1),
                grpc.StatusCode.INVALID_ARGUMENT,
                "OUT_OF_RANGE",
            ),
            (
                "3 WatchEvents after_id > int64",
                lambda: a._stream(
                    a.stub.WatchEvents(WatchEventsRequest(after_id=2**63), metadata=a._metadata)
                ),
                grpc.StatusCode.INVALID_ARGUMENT,
                "OUT_OF_RANGE",
            ),
            # 5. Limits: per message on Chat, joins per Chat stream, failed authentications.
            (
                "5 70 sends on one Chat stream (burst 60)",
                lambda: chat(
                    chatty,
                    [
                        ChatRequest(
                            send=SendMessageRequest(
                                session_key="table:chatty", text="again", idempotency_key="same"
                            )
                        )
                    ]
                    * 70,
                ),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "RATE_LIMITED",
            ),
            (
                "5 joins of five live runs on one Chat stream (cap 4)",
                lambda: chat(joiner, [ChatRequest(join=JoinRunRequest(run_id=run)) for run in live]),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "TOO_MANY_FOLLOWS",
            ),
            *[
                (
                    f"5 bad key #{n + 1} from one address",
                    lambda: collect(_bad(stack, bad_key)),
                    grpc.StatusCode.UNAUTHENTICATED,
                    "API_KEY_INVALID",
                )
                for n in range(5)
            ],
            (
                "5 sixth bad key: refused before the lookup",
                lambda: collect(_bad(stack, bad_key)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "AUTH_RATE_LIMITED",
            ),
            # 6-7. Internal traffic: not on the public port, not without the secret.
            (
                "7 WorkerHub on the public port",
                lambda: collect(WorkerHubServiceStub(public_channel).Connect(nothing(), metadata=internal)),
                grpc.StatusCode.UNIMPLEMENTED,
                "UNIMPLEMENTED",
            ),
            (
                "7 TaskService on the public port",
                lambda: tasks_pb2_grpc.TaskServiceStub(public_channel).GetTask(
                    tasks_pb2.TaskServiceGetTaskRequest(), metadata=internal
                ),
                grpc.StatusCode.UNIMPLEMENTED,
                "UNIMPLEMENTED",
            ),
            (
                "7 AdminService on the public port",
                lambda: admin_pb2_grpc.AdminServiceStub(public_channel).GetStatus(
                    admin_pb2.GetStatusRequest()
                ),
                grpc.StatusCode.UNIMPLEMENTED,
                "UNIMPLEMENTED",
            ),
            (
                "6 WorkerHub on the internal port without the secret",
                lambda: collect(WorkerHubServiceStub(internal_channel).Connect(hello())),
                grpc.StatusCode.UNAUTHENTICATED,
                "INTERNAL_AUTH_REQUIRED",
            ),
            (
                "6 AdminService on the internal port without the secret",
                lambda: admin_pb2_grpc.AdminServiceStub(internal_channel).GetStatus(
                    admin_pb2.GetStatusRequest()
                ),
                grpc.StatusCode.UNAUTHENTICATED,
                "INTERNAL_AUTH_REQUIRED",
            ),
            (
                "6 sessions without the secret, even with a valid run token",
                lambda: SessionServiceStub(sessions_channel).GetTranscript(
                    GetTranscriptRequest(run_token=spent_token)
                ),
                grpc.StatusCode.UNAUTHENTICATED,
                "INTERNAL_AUTH_REQUIRED",
            ),
            # 8. Run tokens: only the gateway's key signs; a finished run's token is spent.
            (
                "8 token signed HS256 with the internal secret (a worker's credential)",
                lambda: SessionServiceStub(sessions_channel).GetTranscript(
                    GetTranscriptRequest(run_token=forged_token(INTERNAL_SECRET, "HS256")), metadata=internal
                ),
                grpc.StatusCode.UNAUTHENTICATED,
                "RUN_TOKEN_INVALID",
            ),
            (
                "8 token signed HS256 keyed with the public key",
                lambda: collect(
                    RouterServiceStub(router_channel).Generate(
                        GenerateRequest(
                            run=RunPayload(
                                run_id=str(uuid.uuid4()),
                                run_token=forged_token(RUN_TOKEN_PUBLIC_KEY, "HS256"),
                            ),
                            messages=[Message(content="hi")],
                        ),
                        metadata=internal,
                    )
                ),
                grpc.StatusCode.UNAUTHENTICATED,
                "RUN_TOKEN_INVALID",
            ),
            (
                "8 token of a run that finished",
                lambda: SessionServiceStub(sessions_channel).GetTranscript(
                    GetTranscriptRequest(run_token=spent_token), metadata=internal
                ),
                grpc.StatusCode.FAILED_PRECONDITION,
                "RUN_NOT_ACTIVE",
            ),
        ]
        mismatches = []
        for name, call, code, reason in table:
            got = await status_of(call)
            if got[:2] != (code, reason):
                mismatches.append((name, got, (code, reason)))
            # Error messages never echo unbounded input (and never overflow the trailers).
            if len(got[2]) > 400 or LONG_KEY[:1000] in got[2]:
                mismatches.append((name, "message too long", len(got[2])))
        assert not mismatches, "\n".join(map(str, mismatches))

        # Nothing was written for the refused messages: no session behind "table:nul".
        assert (await status_of(lambda: a.unary("GetSession", GetSessionRequest(session_key="table:nul"))))[
            :2
        ] == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        # The public port reflects only the public API; the internal one its own services.
        assert await _reflected(public_channel) == {
            "runyard.v1.GatewayService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
            "grpc.reflection.v1.ServerReflection",
        }
        assert "runyard.v1.WorkerHubService" in await _reflected(internal_channel, internal)
        # 9. A database blip right before a message: the message still goes through.
        assert await terminate_backends(stack.database_url) > 0
        assert (await collect(a.send("table:blip", "after the blip")))[-1].HasField("completed")
        rest = await collect(slow)
        assert rest[-1].HasField("completed")
        for channel in (internal_channel, public_channel, sessions_channel, router_channel):
            await channel.close()

    # Healthy and within memory afterwards; nothing logged that the issue named.
    for name in ("gateway", "router", "sessions"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[name]}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    for name, proc in stack.procs.items():
        assert proc.returncode is None, name
        assert rss_mb(proc.pid) < MAX_RSS_MB, (name, rss_mb(proc.pid))
        log = stack.logs(name)
        for text in ("too_many_pings", "Task exception was never retrieved", "unhandled error"):
            assert text not in log, (name, text)
    async with stack.client(keys["after"]) as after:
        assert (await collect(after.send("table:after", "still there?")))[-1].HasField("completed")


def _bad(stack: Stack, key: str):
    client = stack.client(key)

    async def events():
        async with client:
            async for event in client.send("table:bad", "hi"):
                yield event

    return events()


async def _reflected(channel: grpc.aio.Channel, metadata=()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in stub.ServerReflectionInfo(ask(), metadata=metadata):
        return {service.name for service in reply.list_services_response.service}
    return set()


def test_a_service_refuses_to_start_without_an_internal_secret():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    env.update(
        {
            "RUNYARD_DATABASE_URL": "postgresql://127.0.0.1:1/none",
            "RUNYARD_RUN_TOKEN_PUBLIC_KEY": RUN_TOKEN_PUBLIC_KEY,
        }
    )
    for service in ("router", "sessions", "worker"):
        result = subprocess.run(
            [sys.executable, "-m", "runyard", "serve", service],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        assert result.returncode == 2, (service, result.stderr)
        assert "auth.internal_secret: required" in result.stderr, result.stderr
    gateway = subprocess.run(
        [sys.executable, "-m", "runyard", "serve", "gateway"],
        env={**env, "RUNYARD_RUN_TOKEN_PRIVATE_KEY": RUN_TOKEN_PRIVATE_KEY},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert gateway.returncode == 2 and "auth.internal_secret: required" in gateway.stderr, gateway.stderr
    # A worker given the signing key is refused too: only the gateway signs.
    worker = subprocess.run(
        [sys.executable, "-m", "runyard", "serve", "worker"],
        env={
            **env,
            "RUNYARD_INTERNAL_SECRET": INTERNAL_SECRET,
            "RUNYARD_RUN_TOKEN_PRIVATE_KEY": RUN_TOKEN_PRIVATE_KEY,
        },
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        check=False,
    )
    assert worker.returncode == 2 and "only the gateway signs run tokens" in worker.stderr, worker.stderr
    assert load_private_key(RUN_TOKEN_PRIVATE_KEY) is not None


@pytest.mark.timeout(120)
async def test_run_tokens_are_short_lived_and_renewed_with_the_lease(stack_factory):
    # Tokens live 3 s; a run takes about 6 s and calls sessions at its end with a renewed token.
    stack = await stack_factory(
        {
            "auth": {"run_token_ttl_s": 3},
            "providers": {"echo": {"type": "echo", "echo_delay_ms": 200}},
        }
    ).start()
    async with stack.client() as client:
        events = await collect(client.send("renew:1", " ".join(["word"] * 30)))
        assert events[-1].HasField("completed"), events[-1]
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="renew:1"))
        assert len(messages.messages) == 2
    assert "RUN_TOKEN_EXPIRED" not in stack.logs("worker-1")


def _text(events) -> str:
    """The answer as a client shows it: a restart (``started`` of a later attempt,
    or a failover with ``restart_output``) discards what was streamed before."""
    text = ""
    for event in events:
        kind = event.WhichOneof("event")
        if (
            kind == "started"
            and event.started.attempt > 1
            or kind == "model_failover"
            and event.model_failover.restart_output
        ):
            text = ""
        elif kind == "text_delta":
            text += event.text_delta.text
    return text


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_chaos_dropped_database_connections_fail_lose_and_duplicate_nothing(stack_factory):
    """20 sessions, 3 messages each, while every database connection of every
    service is terminated every 0.7 s: every run completes once, with
    gap-free events and the answer streamed exactly once."""
    stack: Stack = await stack_factory(
        {
            "providers": {"echo": {"type": "echo", "echo_delay_ms": 15}},
            "gateway": {"rate_limit_rps": 0},
            "database": {"pool_min_size": 1},
        }
    ).start(workers=2)
    stop = asyncio.Event()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        while not stop.is_set():
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                kills += await terminate_backends(stack.database_url)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.7)

    async def converse(n: int) -> list[tuple[str, str]]:
        runs = []
        async with stack.client() as client:
            for turn in range(3):
                key, text = f"chaos-{n}-{turn}", f"session {n} turn {turn} " + "x " * 10
                run_id = ""
                for _attempt in range(60):  # what a well-behaved client does: retry with the same key
                    try:
                        events = await collect(client.send(f"chaos:{n}", text, idempotency_key=key))
                        run_id = events[0].run_id
                        if events[-1].WhichOneof("event") in ("completed", "failed", "cancelled"):
                            break
                    except RunyardError as exc:
                        assert exc.code == grpc.StatusCode.UNAVAILABLE, (key, exc)  # never INTERNAL
                    await asyncio.sleep(0.2)
                runs.append((key, run_id))
        return runs

    killing = asyncio.create_task(killer())
    try:
        results = await asyncio.gather(*(converse(n) for n in range(20)))
    finally:
        stop.set()
        await killing
    assert kills > 0
    problems: list[str] = []
    duplicated = 0
    async with stack.client() as client:
        for runs in results:
            for key, run_id in runs:
                if not run_id:
                    problems.append(f"{key}: lost (no run)")
                    continue
                run = (await client.unary("GetRun", GetRunRequest(run_id=run_id))).run
                events = await collect(client.join(run_id))
                seqs = [e.seq for e in events]
                if seqs != list(range(1, len(seqs) + 1)):
                    problems.append(f"{key}: seqs {seqs}")
                terminal = [
                    e for e in events if e.WhichOneof("event") in ("completed", "failed", "cancelled")
                ]
                if len(terminal) != 1 or not terminal[0].HasField("completed"):
                    problems.append(
                        f"{key}: ended {[e.WhichOneof('event') for e in terminal]} ({run.status})"
                    )
                    continue
                if _text(events) != terminal[0].completed.message.content:
                    duplicated += 1
                    problems.append(
                        f"{key}: streamed {_text(events)!r} != {terminal[0].completed.message.content!r}"
                    )
        for n in range(20):
            messages = (
                await client.unary("GetMessages", GetMessagesRequest(session_key=f"chaos:{n}"))
            ).messages
            contents = [m.content for m in messages]
            if len(contents) != 6 or len(set(contents)) != 6:
                problems.append(f"chaos:{n}: transcript {contents}")
    for name in stack.procs:
        assert "unhandled error" not in stack.logs(name), name
    assert not problems, "\n".join(problems[:20])
    assert duplicated == 0
