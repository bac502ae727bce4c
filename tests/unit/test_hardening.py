"""Issue 11 in process: request validation, fault mapping, run-token keys,
auth-failure limits, keepalive agreement and the gateway's stream helper."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from types import SimpleNamespace

import asyncpg
import grpc
import jwt
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from runyard._proto.v1 import sessions_pb2
from runyard.common import auth, faults
from runyard.common.channels import grpc_options, grpc_server_options
from runyard.common.config import ConfigError, load_config
from runyard.common.errors import InvalidArgument, ResourceExhausted, Unauthenticated, Unavailable
from runyard.common.runtime import check_service_config
from runyard.common.validation import check_request
from runyard.gateway.auth import Authenticator
from runyard.v1 import (
    ChatRequest,
    GetSessionRequest,
    JoinRunRequest,
    ListSessionsRequest,
    Message,
    SendMessageRequest,
    WatchEventsRequest,
)
from tests.stack import INTERNAL_SECRET, RUN_TOKEN_PRIVATE_KEY, RUN_TOKEN_PUBLIC_KEY

RUN = "2b1e2c56-8d27-4b0c-a4a6-5a0c2d3e4f50"


@pytest.mark.parametrize(
    ("message", "reason", "field"),
    [
        (SendMessageRequest(text="hi"), "MISSING_FIELD", "session_key"),
        (SendMessageRequest(session_key="k" * 5000, text="hi"), "SESSION_KEY_TOO_LONG", "session_key"),
        (SendMessageRequest(session_key="a b", text="hi"), "INVALID_SESSION_KEY", "session_key"),
        (SendMessageRequest(session_key="k", text="a\x00b"), "NUL_CHARACTER", "text"),
        (
            SendMessageRequest(session_key="k", text="hi", idempotency_key="i\x00"),
            "NUL_CHARACTER",
            "idempotency_key",
        ),
        (
            SendMessageRequest(session_key="k", text="hi", metadata={"m": "v\x00"}),
            "NUL_CHARACTER",
            "metadata['m']",
        ),
        (
            SendMessageRequest(session_key="k", text="hi", multitask_strategy=99),
            "INVALID_ENUM_VALUE",
            "multitask_strategy",
        ),
        (
            SendMessageRequest(session_key="k", text="hi", idempotency_key="i" * 256),
            "IDEMPOTENCY_KEY_TOO_LONG",
            "idempotency_key",
        ),
        (ChatRequest(send=SendMessageRequest(session_key="k", text="\x00")), "NUL_CHARACTER", "send.text"),
        (GetSessionRequest(), "MISSING_FIELD", "session_id"),
        (GetSessionRequest(session_key="k" * 10_000), "SESSION_KEY_TOO_LONG", "session_key"),
        (GetSessionRequest(session_id="not-a-uuid"), "INVALID_ID", "session_id"),
        (ListSessionsRequest(agent_id="a\x00"), "NUL_CHARACTER", "agent_id"),
        (JoinRunRequest(run_id=RUN, after_seq=2**63), "OUT_OF_RANGE", "after_seq"),
        (ChatRequest(join=JoinRunRequest(run_id=RUN, after_seq=2**64 - 1)), "OUT_OF_RANGE", "join.after_seq"),
        (WatchEventsRequest(after_id=2**63), "OUT_OF_RANGE", "after_id"),
        (sessions_pb2.ListEventsRequest(after_id=2**63), "OUT_OF_RANGE", "after_id"),
        (
            sessions_pb2.SessionServiceGetSessionRequest(org_id="o", session_key="k" * 5000),
            "SESSION_KEY_TOO_LONG",
            "session_key",
        ),
        (sessions_pb2.ResolveSessionRequest(org_id="o"), "MISSING_FIELD", "session_key"),
    ],
)
def test_invalid_requests_name_the_field_and_never_echo_the_value(message, reason, field):
    with pytest.raises(InvalidArgument) as raised:
        check_request(message)
    assert (raised.value.reason, raised.value.field) == (reason, field)
    assert len(raised.value.message) < 200 and "\x00" not in raised.value.message
    assert "kkkkkkkkkk" not in raised.value.message


def test_conversation_content_may_hold_any_character_and_valid_requests_pass():
    check_request(SendMessageRequest(session_key="telegram:chat:42", text="hello", metadata={"a": "b"}))
    check_request(JoinRunRequest(run_id=RUN, after_seq=2**63 - 1))
    # A model may produce U+0000; transcripts are stored as protobuf bytes.
    check_request(
        sessions_pb2.CommitRunRequest(
            org_id="o", append=sessions_pb2.TranscriptAppend(messages=[Message(content="a\x00b")])
        )
    )


def test_database_faults_map_to_unavailable_and_unstorable_values_to_invalid_argument():
    for exc in (
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        ConnectionResetError("reset"),
    ):
        mapped = faults.as_runyard_error(exc)
        assert isinstance(mapped, Unavailable) and mapped.reason == "DATABASE_UNAVAILABLE", exc
        assert mapped.retry_after_s is not None
    refused = faults.as_runyard_error(
        asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence")
    )
    assert isinstance(refused, InvalidArgument) and refused.reason == "UNSTORABLE_VALUE"
    assert faults.as_runyard_error(KeyError("bug")) is None  # a bug stays INTERNAL


async def test_a_database_blip_is_retried_after_a_backoff_and_within_the_budget():
    times: list[float] = []

    async def down() -> str:
        times.append(time.monotonic())
        raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")

    with pytest.raises(asyncpg.exceptions.CannotConnectNowError):
        await faults.retry_transient(down, budget_s=0.3)
    # Retried, after a backoff from 50 ms on (a lower bound only: a slow
    # machine waits longer), until the budget ran out.
    assert len(times) >= 2
    assert times[1] - times[0] >= 0.045


async def test_idempotent_calls_are_retried_past_a_database_blip_and_others_are_not():
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise asyncpg.exceptions.AdminShutdownError("terminating connection")
        return "ok"

    assert await faults.retry_transient(flaky, budget_s=5) == "ok" and calls == 3
    # A bug is not retried.
    calls = 0

    async def broken() -> str:
        nonlocal calls
        calls += 1
        raise KeyError("bug")

    with pytest.raises(KeyError):
        await faults.retry_transient(broken, budget_s=5)
    assert calls == 1
    # The contract says which methods are safe to repeat.
    assert faults.rpc_idempotent("/runyard.v1.SessionService/GetSession")
    assert faults.rpc_idempotent("/runyard.v1.SessionService/CommitRun")
    assert not faults.rpc_idempotent("/runyard.v1.GatewayService/SendMessage")
    assert not faults.rpc_idempotent("/runyard.v1.GatewayService/ResetSession")


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True),
        (grpc.StatusCode.UNKNOWN, "Stream removed", True),
        (grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2", True),
        (grpc.StatusCode.CANCELLED, "CANCELLED", True),  # a stopping server ended the call
        (grpc.StatusCode.INTERNAL, "internal error", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad", False),
    ],
)
def test_infrastructure_errors_are_told_from_answers(code, details, expected):
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
    assert faults.infrastructure_error(error) is expected


def test_model_verdicts_are_not_infrastructure():
    assert not faults.infrastructure_error(Unavailable("every model failed", reason="ALL_MODELS_FAILED"))
    assert faults.infrastructure_error(Unavailable("db", reason="DATABASE_UNAVAILABLE"))


def test_only_the_private_key_signs_and_tokens_of_other_keys_or_algorithms_are_refused():
    signer = auth.RunTokenSigner(RUN_TOKEN_PRIVATE_KEY, ttl_s=30)
    verifier = auth.RunTokenVerifier(RUN_TOKEN_PUBLIC_KEY)  # what router, sessions and workers hold
    token = signer.sign(org_id="o", agent_id="a", session_id="s", run_id=RUN, epoch=2)
    claims = verifier.verify(token)
    assert (claims.run_id, claims.epoch) == (RUN, 2) and claims.expires_at - claims.issued_at == 30
    assert not hasattr(verifier, "sign")
    with pytest.raises(ValueError):
        auth.RunTokenSigner(RUN_TOKEN_PUBLIC_KEY)  # a public key cannot sign
    body = {
        "iss": "runyard.gateway",
        "aud": "runyard.internal",
        "sub": RUN,
        "iat": int(time.time()),
        "exp": int(time.time()) + 60,
        "org": "o",
        "agt": "a",
        "ses": "s",
        "epo": 2,
    }
    other_private, _ = auth.generate_run_token_keys()
    forgeries = {
        "hs256 with the internal secret": jwt.encode(body, INTERNAL_SECRET, algorithm="HS256"),
        "hs256 keyed with the public key": jwt.encode(body, RUN_TOKEN_PUBLIC_KEY, algorithm="HS256"),
        "another ed25519 key": jwt.encode(body, auth.load_private_key(other_private), algorithm="EdDSA"),
        "alg none": jwt.encode(body, None, algorithm="none"),
    }
    for name, forged in forgeries.items():
        with pytest.raises(Unauthenticated) as refused:
            verifier.verify(forged)
        assert refused.value.reason == "RUN_TOKEN_INVALID", name
    expired = auth.RunTokenSigner(RUN_TOKEN_PRIVATE_KEY, ttl_s=-60).sign(
        org_id="o", agent_id="a", session_id="s", run_id=RUN, epoch=2
    )
    with pytest.raises(Unauthenticated) as old:
        verifier.verify(expired)
    assert old.value.reason == "RUN_TOKEN_EXPIRED"


def test_services_refuse_to_start_without_the_secret_or_with_the_wrong_half_of_the_key_pair():
    base = {"RUNYARD_DATABASE_URL": "postgresql://x/y"}
    with pytest.raises(ConfigError) as no_secret:
        check_service_config(
            load_config(environ={**base, "RUNYARD_RUN_TOKEN_PUBLIC_KEY": RUN_TOKEN_PUBLIC_KEY}), "router"
        )
    assert [path for path, _ in no_secret.value.problems] == ["auth.internal_secret"]
    worker_with_signing_key = {
        **base,
        "RUNYARD_INTERNAL_SECRET": INTERNAL_SECRET,
        "RUNYARD_RUN_TOKEN_PRIVATE_KEY": RUN_TOKEN_PRIVATE_KEY,
    }
    with pytest.raises(ConfigError) as misplaced:
        check_service_config(load_config(environ=worker_with_signing_key), "worker")
    assert "only the gateway signs" in str(misplaced.value)
    check_service_config(load_config(environ=worker_with_signing_key), "gateway")
    with pytest.raises(ConfigError) as retired:
        load_config(environ={**base, "RUNYARD_RUN_TOKEN_SECRET": "x" * 40})
    assert "Ed25519" in str(retired.value)
    with pytest.raises(ConfigError) as mismatched:
        load_config(
            environ={
                "RUNYARD_RUN_TOKEN_PRIVATE_KEY": RUN_TOKEN_PRIVATE_KEY,
                "RUNYARD_RUN_TOKEN_PUBLIC_KEY": auth.generate_run_token_keys()[1],
            }
        )
    assert "public half" in str(mismatched.value)


class _Context:
    def __init__(self, peer: str, token: str = ""):
        self._peer = peer
        self._token = token

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self):
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()


class _Keys:
    def __init__(self):
        self.lookups = 0

    async def verify(self, token: str):
        self.lookups += 1
        if token.endswith("G" * 43):
            return SimpleNamespace(org_id="org", scopes=frozenset({"chat"}), key_id="aaaaaaaaaaaa")
        raise Unauthenticated("the API key is not valid", reason="API_KEY_INVALID")


async def test_failed_authentications_are_limited_per_source_and_per_key_id_before_any_lookup():
    keys = _Keys()
    authn = Authenticator(
        keys, anonymous=False, default_org="d", auth_failure_rate_per_s=0.5, auth_failure_burst=3
    )
    good = "ryk_aaaaaaaaaaaa_" + "G" * 43
    assert (await authn.authenticate(_Context("ipv4:10.0.0.9:1", good))).org_id == "org"
    # One source guessing: three failures, then refused without a lookup.
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            await authn.authenticate(_Context("ipv4:10.0.0.1:5000", "ryk_bbbbbbbbbbbb_" + "x" * 43))
    before = keys.lookups
    with pytest.raises(ResourceExhausted) as limited:
        await authn.authenticate(_Context("ipv4:10.0.0.1:5001", "ryk_cccccccccccc_" + "x" * 43))
    assert limited.value.reason == "AUTH_RATE_LIMITED" and limited.value.retry_after_s
    assert keys.lookups == before
    # Many sources guessing one key id: that key id is refused unread...
    for n in range(3):
        with pytest.raises(Unauthenticated):
            await authn.authenticate(_Context(f"ipv4:10.1.0.{n}:1", "ryk_aaaaaaaaaaaa_" + "y" * 43))
    with pytest.raises(ResourceExhausted):
        await authn.authenticate(_Context("ipv4:10.2.0.1:1", "ryk_aaaaaaaaaaaa_" + "z" * 43))
    # ... while its real holder (verified here before) still gets in, from a fresh address.
    authn.forget()
    assert (await authn.authenticate(_Context("ipv4:10.3.0.1:1", good))).key_id == "aaaaaaaaaaaa"


async def test_chat_messages_are_charged_one_by_one():
    authn = Authenticator(None, anonymous=True, default_org="d", rate_limit_rps=0.001, rate_limit_burst=3)
    principal = await authn.authenticate(_Context("ipv4:1.2.3.4:1"), charge=False)
    for _ in range(3):
        authn.charge(principal)
    with pytest.raises(ResourceExhausted) as limited:
        authn.charge(principal)
    assert limited.value.reason == "RATE_LIMITED"


async def _states_while_idle(server_options, seconds: float) -> list[grpc.ChannelConnectivity]:
    server = grpc.aio.server(options=server_options)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(keepalive_time_ms=300))
    states: list[grpc.ChannelConnectivity] = []
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

        async def watch() -> None:
            state = channel.get_state()
            while True:
                await channel.wait_for_state_change(state)
                state = channel.get_state()
                states.append(state)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(seconds)  # no call open: only keepalive pings cross the connection
        watcher.cancel()
    finally:
        await channel.close()
        await server.stop(0)
    return states


@pytest.mark.timeout(60)
async def test_server_keepalive_policy_accepts_the_clients_pings():
    # gRPC clients ping about once a second at most; gRPC's default server
    # policy answers the fourth idle ping with GOAWAY too_many_pings (the
    # connection drops to IDLE). Ours accepts them: the connection stays up.
    assert await _states_while_idle(grpc_server_options(keepalive_time_ms=300), 5.5) == []
    assert grpc.ChannelConnectivity.IDLE in await _states_while_idle([("grpc.so_reuseport", 0)], 5.5)


async def test_stream_helper_never_leaves_a_finished_read_unretrieved(monkeypatch):
    """The gateway's ``_stream``: a client that hangs up right after the last
    event (while the next read is finding the end of the run) leaves no
    finished read behind, so asyncio never logs "Task exception was never
    retrieved ... StopAsyncIteration"."""
    from runyard.gateway import service as gateway_service

    async def one_event(*_args, **_kwargs):
        yield SimpleNamespace(seq=1)  # the run's last event; then the run is over

    monkeypatch.setattr(gateway_service, "follow", one_event)
    servicer = object.__new__(gateway_service.GatewayServicer)
    servicer.store = servicer.broker = servicer.runlog = None
    servicer.closing = asyncio.Event()
    unretrieved: list[dict] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        for _ in range(20):
            got = asyncio.Event()

            async def client(got: asyncio.Event = got) -> None:
                async for _event in servicer._stream(RUN, RUN, 0):
                    got.set()

            task = asyncio.create_task(client())
            await got.wait()
            task.cancel()  # the client hangs up as the stream looks for the next event
            with contextlib.suppress(asyncio.CancelledError):
                await task
            del task
            gc.collect()
        await asyncio.sleep(0.05)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert not [c for c in unretrieved if "never retrieved" in str(c.get("message", ""))], unretrieved
