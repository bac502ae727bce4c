"""Authentication, org isolation, run tokens, limits and hostile input
(issue 5, security). Every case gets its documented status and reason, and
the stack is still healthy afterwards."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import grpc
import jwt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runyard import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RunyardError,
    Unauthenticated,
)
from runyard.common.auth import internal_metadata, load_private_key
from runyard.common.errors import from_rpc_error
from runyard.gateway.keys import ApiKeyStore
from runyard.v1 import (
    Attachment,
    CancelRunRequest,
    ChatRequest,
    ConnectRequest,
    GatewayServiceStub,
    GenerateRequest,
    GetRunRequest,
    GetSessionRequest,
    GetTranscriptRequest,
    ListSessionsRequest,
    Message,
    ResetSessionRequest,
    ResolveSessionRequest,
    RouterServiceStub,
    RunPayload,
    SendMessageRequest,
    SessionServiceStub,
    WorkerHello,
    WorkerHubServiceStub,
)
from tests.stack import INTERNAL_SECRET, RUN_TOKEN_SECRET
from tests.support import collect

pytestmark = pytest.mark.timeout(120)


async def _keys(url: str) -> dict[str, str]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        store = ApiKeyStore(pool)
        everything = ["chat", "sessions:read", "sessions:admin", "events"]
        _, a = await store.create("org-a", "a", everything)
        _, b = await store.create("org-b", "b", everything)
        _, read_only = await store.create("org-a", "ro", ["sessions:read"])
        revoked_key, revoked = await store.create("org-a", "old", ["chat"])
        await store.revoke(revoked_key.key_id)
        return {"a": a, "b": b, "ro": read_only, "revoked": revoked}
    finally:
        await pool.close()


def _token(**overrides: object) -> str:
    claims = {
        "iss": "runyard.gateway",
        "aud": "runyard.internal",
        "sub": str(uuid.uuid4()),
        "iat": int(time.time()),
        "exp": int(time.time()) + 600,
        "org": "org-a",
        "agt": "default",
        "ses": str(uuid.uuid4()),
        "epo": 1,
    }
    claims.update(overrides)
    # Signed like the gateway signs (Ed25519) unless a test forges it with another key.
    key = claims.pop("_key", load_private_key(RUN_TOKEN_SECRET))
    return jwt.encode(claims, key, algorithm=str(claims.pop("_alg", "EdDSA")))


async def test_hostile_inputs_get_their_status_and_the_stack_stays_healthy(stack_factory, migrated_url):
    keys = await _keys(migrated_url)
    stack = await stack_factory(
        {
            "auth": {"anonymous": False},
            "gateway": {
                "max_text_bytes": 2000,
                "max_metadata_entries": 4,
                "max_session_key_length": 64,
                "rate_limit_rps": 1000,
                "rate_limit_burst": 1000,
                # The rejected-stream race below fails authentication 25 times on purpose.
                "auth_failure_rate_per_s": 1000,
                "auth_failure_burst": 1000,
            },
        }
    ).start()
    async with (
        stack.client(keys["a"]) as a,
        stack.client(keys["b"]) as b,
        stack.client() as anonymous,
        stack.client(keys["ro"]) as read_only,
        stack.client(keys["revoked"]) as revoked,
        stack.client("ryk_aaaaaaaaaaaa_" + "x" * 43) as forged,
        stack.client("not-a-key") as garbage,
    ):
        events = await collect(a.send("shared-key", "org a's secret"))
        run_id, session_id = events[0].run_id, events[0].session_id

        async def expect(error_type, reason, call):
            with pytest.raises(error_type) as raised:
                await call()
            assert raised.value.reason == reason, (reason, raised.value)
            return raised.value

        # Authentication.
        await expect(Unauthenticated, "API_KEY_REQUIRED", lambda: collect(anonymous.send("k", "hi")))
        await expect(Unauthenticated, "API_KEY_INVALID", lambda: collect(forged.send("k", "hi")))
        await expect(Unauthenticated, "API_KEY_INVALID", lambda: collect(garbage.send("k", "hi")))
        await expect(Unauthenticated, "API_KEY_REVOKED", lambda: collect(revoked.send("k", "hi")))
        await expect(PermissionDenied, "SCOPE_REQUIRED", lambda: collect(read_only.send("k", "hi")))

        # Another org sees nothing and learns nothing (NOT_FOUND, not PERMISSION_DENIED).
        await expect(NotFound, "RUN_NOT_FOUND", lambda: b.unary("GetRun", GetRunRequest(run_id=run_id)))
        await expect(NotFound, "RUN_NOT_FOUND", lambda: collect(b.join(run_id)))
        await expect(NotFound, "RUN_NOT_FOUND", lambda: b.unary("CancelRun", CancelRunRequest(run_id=run_id)))
        await expect(
            NotFound,
            "SESSION_NOT_FOUND",
            lambda: b.unary("GetSession", GetSessionRequest(session_id=session_id)),
        )
        await expect(
            NotFound,
            "SESSION_NOT_FOUND",
            lambda: b.unary("ResetSession", ResetSessionRequest(session_key="shared-key")),
        )
        assert list((await b.unary("ListSessions", ListSessionsRequest())).sessions) == []
        # The same key in org b is a different session.
        theirs = await collect(b.send("shared-key", "org b here"))
        assert theirs[0].session_id != session_id

        # Oversize and malformed.
        await expect(InvalidArgument, "TEXT_TOO_LONG", lambda: collect(a.send("k", "x" * 2001)))
        await expect(InvalidArgument, "SESSION_KEY_TOO_LONG", lambda: collect(a.send("k" * 65, "hi")))
        await expect(
            InvalidArgument,
            "METADATA_TOO_LARGE",
            lambda: collect(a.send("k", "hi", metadata={str(i): "v" for i in range(5)})),
        )
        await expect(
            InvalidArgument,
            "IDEMPOTENCY_KEY_TOO_LONG",
            lambda: collect(a.send("k", "hi", idempotency_key="i" * 256)),
        )
        await expect(InvalidArgument, "INVALID_ENUM_VALUE", lambda: collect(a.send("k", "hi", strategy=99)))
        huge = await expect(
            ResourceExhausted, "RESOURCE_EXHAUSTED", lambda: collect(a.send("k", "x" * (5 << 20)))
        )
        assert huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Invalid UTF-8 where the proto says string; any bytes where it says bytes.
        raw_call = a._channel.unary_stream(
            "/runyard.v1.GatewayService/SendMessage",
            request_serializer=lambda b_: b_,
            response_deserializer=lambda b_: b_,
        )
        bad_utf8 = b"\x0a\x01k\x1a\x03\xff\xfe\xfd"  # session_key="k", text=<invalid UTF-8>
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await collect(raw_call(bad_utf8, metadata=(("authorization", f"Bearer {keys['a']}"),)))
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert from_rpc_error(malformed.value).reason == "MALFORMED_REQUEST"
        request = SendMessageRequest(
            session_key="bytes-ok",
            text="see attachment",
            attachments=[
                Attachment(name="b", mime_type="application/octet-stream", data=b"\xff\xfe\x00\x01")
            ],
        )
        ok = await collect(a._stream(a.stub.SendMessage(request, metadata=a._metadata)))
        assert ok[-1].HasField("completed")

    # Internal services refuse callers without the service credential or with bad run tokens.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['sessions']}") as channel:
        sessions = SessionServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as no_secret:
            await sessions.ResolveSession(
                ResolveSessionRequest(org_id="org-a", session_key="x", agent_id="default")
            )
        assert from_rpc_error(no_secret.value).reason == "INTERNAL_AUTH_REQUIRED"
        for token, reason in [
            (_token(_key="forged-secret-forged-secret-forged-secret", _alg="HS256"), "RUN_TOKEN_INVALID"),
            (_token(exp=int(time.time()) - 5), "RUN_TOKEN_EXPIRED"),
            (_token(aud="someone-else"), "RUN_TOKEN_INVALID"),
            ("", "RUN_TOKEN_MISSING"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as bad:
                await sessions.GetTranscript(
                    GetTranscriptRequest(run_token=token), metadata=internal_metadata(INTERNAL_SECRET)
                )
            assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert from_rpc_error(bad.value).reason == reason
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['router']}") as channel:
        router = RouterServiceStub(channel)
        token = _token(ses=session_id)
        other = RunPayload(
            run_id=str(uuid.uuid4()),
            org_id="org-a",
            session_id=str(uuid.uuid4()),
            agent_id="default",
            run_token=token,
        )
        with pytest.raises(grpc.aio.AioRpcError) as scope:
            await collect(
                router.Generate(
                    GenerateRequest(run=other, messages=[Message(content="hi")]),
                    metadata=internal_metadata(INTERNAL_SECRET),
                )
            )
        assert scope.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert from_rpc_error(scope.value).reason == "TOKEN_SCOPE_MISMATCH"
    async with (
        grpc.aio.insecure_channel(stack.gateway_internal_address) as internal,
        grpc.aio.insecure_channel(stack.gateway_address) as channel,
    ):
        hub = WorkerHubServiceStub(internal)

        async def hello():
            yield ConnectRequest(hello=WorkerHello(worker_id="intruder", capacity=1))

        with pytest.raises(grpc.aio.AioRpcError) as intruder:
            await collect(hub.Connect(hello()))
        assert intruder.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # A rejected bidi stream whose first message is still being written when the
        # gateway ends the call must report the real status, never gRPC core's
        # "Internal error from Core" (a race that once failed CI one run in a few hundred).
        gateway = GatewayServiceStub(channel)

        async def chat():
            yield ChatRequest(send=SendMessageRequest(session_key="k", text="hi"))
            await asyncio.sleep(5)  # keep the stream open, as a real client does

        for _ in range(25):
            with pytest.raises(grpc.aio.AioRpcError) as again:
                await collect(hub.Connect(hello()))
            assert again.value.code() == grpc.StatusCode.UNAUTHENTICATED, again.value
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await collect(gateway.Chat(chat(), metadata=(("authorization", "Bearer not-a-key"),)))
            assert rejected.value.code() == grpc.StatusCode.UNAUTHENTICATED, rejected.value
            assert from_rpc_error(rejected.value).reason == "API_KEY_INVALID"

    # Still healthy, still working.
    for name in ("gateway", "router", "sessions"):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports[name]}") as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with stack.client(keys["a"]) as a:
        assert (await collect(a.send("after", "still there?")))[-1].HasField("completed")

    # No secret ever reaches a log.
    for name in stack.procs:
        text = stack.logs(name)
        for secret in (INTERNAL_SECRET, RUN_TOKEN_SECRET, *keys.values()):
            assert secret not in text, (name, "leaks a secret")


async def test_revoking_a_key_takes_effect_at_once_on_a_running_gateway(stack_factory, migrated_url):
    stack = await stack_factory({"auth": {"anonymous": False}}).start(workers=0)
    pool = await asyncpg.create_pool(migrated_url, min_size=1, max_size=2)
    try:
        store = ApiKeyStore(pool)
        key, token = await store.create("org-a", "soon gone", ["sessions:read"])
        async with stack.client(token) as client:
            await client.unary("ListSessions", ListSessionsRequest())  # cached as valid now
            await store.revoke(key.key_id)
            deadline = time.monotonic() + 2
            while True:
                try:
                    await client.unary("ListSessions", ListSessionsRequest())
                except Unauthenticated as exc:
                    assert exc.reason == "API_KEY_REVOKED"
                    break
                assert time.monotonic() < deadline, "revocation did not reach the gateway"
                await asyncio.sleep(0.02)
    finally:
        await pool.close()


async def test_rate_limit_and_stream_limit_per_key(stack_factory, fake_openai):
    from tests.fakes.openai_server import Reply, provider_config

    fake_openai.default("model-a", Reply(chunks=["slow "] * 50, delay_between_s=0.05))
    config = provider_config(fake_openai)
    config["gateway"] = {"rate_limit_rps": 2, "rate_limit_burst": 4, "max_streams_per_key": 2}
    stack = await stack_factory(config).start()
    async with stack.client() as client:
        results = []
        for _ in range(6):
            try:
                await client.unary("ListSessions", ListSessionsRequest())
                results.append("ok")
            except ResourceExhausted as exc:
                results.append(exc.reason)
                assert exc.retry_after_s and 0 < exc.retry_after_s <= 0.5
        assert results[:4] == ["ok"] * 4
        assert "RATE_LIMITED" in results[4:]
        await asyncio.sleep(2.2)  # the bucket refills

        streams = [client.send(f"s{i}", "go") for i in range(2)]
        firsts = [await anext(s) for s in streams]
        with pytest.raises(ResourceExhausted) as too_many:
            await collect(client.join(firsts[0].run_id))
        assert too_many.value.reason == "TOO_MANY_STREAMS"
        for stream in streams:
            await stream.aclose()
        await asyncio.sleep(0.3)
        joined = await anext(client.join(firsts[0].run_id))
        assert joined.seq == 1
    assert isinstance(too_many.value, RunyardError)
