"""The main job end to end: four service processes, real PostgreSQL, a
provider on loopback (DESIGN.md section 2)."""

from __future__ import annotations

import asyncio
import signal
import uuid

import asyncpg
import pytest

from runyard import FailedPrecondition, InvalidArgument, NotFound, RunyardError
from runyard.v1 import (
    FAILOVER_REASON_MODEL_NOT_FOUND,
    MULTITASK_STRATEGY_REJECT,
    ROLE_ASSISTANT,
    ROLE_USER,
    GetMessagesRequest,
    GetRunRequest,
    GetSessionRequest,
    ListRunsRequest,
    ListSessionsRequest,
    ResetSessionRequest,
    RunEvent,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, provider_config
from tests.support import assert_gap_free, collect, count, kinds, text_of

pytestmark = pytest.mark.timeout(90)


async def test_two_messages_stream_in_order_and_second_sees_first(stack_factory, fake_openai: FakeOpenAI):
    fake_openai.script("model-a", Reply(chunks=["The ", "sky ", "is ", "blue."]), Reply(chunks=["Yes."]))
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        first = await collect(client.send("chat:1", "What colour is the sky?"))
        second = await collect(client.send("chat:1", "Are you sure?"))

    for events in (first, second):
        assert_gap_free(events)
        assert kinds(events)[0] == "queued"
        assert kinds(events)[-1] == "completed"
        assert len({e.run_id for e in events}) == 1
    # The provider sent the four chunks at once: deltas that are already
    # waiting travel together (never waiting for one another).
    assert text_of(first) == "The sky is blue."
    assert first[-1].completed.message.content == "The sky is blue."
    assert first[-1].completed.model == "fake/model-a"
    assert text_of(second) == "Yes."

    # The second request the provider received carries the first exchange.
    requests = fake_openai.requests_for("model-a")
    assert len(requests) == 2
    history = [(m["role"], m["content"]) for m in requests[1]["messages"]]
    assert history == [
        ("system", "Be brief."),
        ("user", "What colour is the sky?"),
        ("assistant", "The sky is blue."),
        ("user", "Are you sure?"),
    ]


async def test_same_idempotency_key_gives_one_run(stack_factory, fake_openai: FakeOpenAI):
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        first = await collect(client.send("chat:idem", "hello", idempotency_key="k-1"))
        again = await collect(client.send("chat:idem", "hello", idempotency_key="k-1"))
        runs = await client.unary("ListRuns", ListRunsRequest(session_key="chat:idem"))
        with pytest.raises(InvalidArgument) as reused:
            await collect(client.send("chat:idem", "a different text", idempotency_key="k-1"))

    assert first[0].run_id == again[0].run_id
    assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in first]
    assert len(runs.runs) == 1
    assert len(fake_openai.requests_for("model-a")) == 1
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert reused.value.field == "idempotency_key"


async def test_join_run_resumes_without_gap_or_duplicate(stack_factory, fake_openai: FakeOpenAI):
    words = [f"w{i} " for i in range(30)]
    fake_openai.script("model-a", Reply(chunks=words, delay_between_s=0.03))
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        seen: list[RunEvent] = []
        stream = client.send("chat:join", "count")
        async for event in stream:
            seen.append(event)
            if len(seen) == 8:
                break
        await stream.aclose()  # the client drops its stream mid-run
        assert kinds(seen)[-1] != "completed"
        rest = await collect(client.join(seen[-1].run_id, after_seq=seen[-1].seq))
        replay = await collect(client.join(seen[-1].run_id, after_seq=3))

    everything = seen + rest
    assert_gap_free(everything)
    assert kinds(everything)[-1] == "completed"
    assert text_of(everything) == "".join(words)
    assert_gap_free(replay, start=4)
    assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in everything[3:]]


async def test_worker_killed_mid_run_is_requeued_and_completes_once(stack_factory, fake_openai: FakeOpenAI):
    slow = Reply(chunks=[f"t{i} " for i in range(40)], delay_between_s=0.05)
    fake_openai.script("model-a", slow)
    fake_openai.default("model-a", Reply(chunks=["recovered ", "answer"]))
    stack = await stack_factory(provider_config(fake_openai)).start(workers=2)
    async with stack.client() as client:
        events: list[RunEvent] = []
        killed = None
        async for event in client.send("chat:kill", "long question"):
            events.append(event)
            if event.HasField("started") and killed is None:
                killed = event.started.worker_id
            if killed and len(events) == 6:
                await stack.stop(killed, signal.SIGKILL)
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:kill"))
        run = await client.unary("GetRun", GetRunRequest(run_id=events[0].run_id))

    assert_gap_free(events)
    starts = [e.started for e in events if e.HasField("started")]
    assert [s.attempt for s in starts] == [1, 2]
    assert starts[0].worker_id != starts[1].worker_id
    assert events[-1].HasField("completed")
    assert events[-1].completed.message.content == "recovered answer"
    assert [(m.role, m.content) for m in messages.messages] == [
        (ROLE_USER, "long question"),
        (ROLE_ASSISTANT, "recovered answer"),
    ]
    assert run.run.attempt == 2


async def test_failover_before_first_token_is_visible_and_lands_on_fallback(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script(
        "model-a",
        Reply(
            status=404,
            body='{"error": {"message": "The model `model-a` does not exist", "code": "model_not_found"}}',
        ),
    )
    fake_openai.script("model-b", Reply(chunks=["from ", "b"]))
    stack = await stack_factory(provider_config(fake_openai, fallbacks=["fake/model-b"])).start()
    async with stack.client() as client:
        events = await collect(client.send("chat:fo", "hi"))

    assert_gap_free(events)
    failovers = [e.model_failover for e in events if e.HasField("model_failover")]
    assert len(failovers) == 1
    assert (failovers[0].from_model, failovers[0].to_model) == ("fake/model-a", "fake/model-b")
    assert failovers[0].reason == FAILOVER_REASON_MODEL_NOT_FOUND
    assert not failovers[0].restart_output
    assert text_of(events) == "from b"
    assert events[-1].completed.model == "fake/model-b"


async def test_failed_run_writes_no_snapshot_and_ends_with_structured_error(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.default("model-a", Reply(status=503, body='{"error": {"message": "overloaded"}}'))
    fake_openai.default("model-b", Reply(status=500, body="internal error"))
    stack = await stack_factory(provider_config(fake_openai, fallbacks=["fake/model-b"])).start()
    async with stack.client() as client:
        events = await collect(client.send("chat:fail", "hi"))
        session = await client.unary("GetSession", GetSessionRequest(session_key="chat:fail"))
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:fail"))

    assert events[-1].HasField("failed")
    error = events[-1].failed.error
    assert (error.code, error.reason) == ("UNAVAILABLE", "ALL_MODELS_FAILED")
    assert error.retryable
    assert "fake/model-b" in error.message
    assert session.session.message_count == 0
    assert list(messages.messages) == []


async def test_restarting_the_whole_stack_keeps_the_transcript(stack_factory, fake_openai: FakeOpenAI):
    config = provider_config(fake_openai)
    stack = await stack_factory(config).start()
    async with stack.client() as client:
        await collect(client.send("chat:restart", "remember me"))
    await stack.close()

    stack = await stack_factory(config).start()
    async with stack.client() as client:
        before = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:restart"))
        await collect(client.send("chat:restart", "do you?"))
    assert [m.content for m in before.messages] == ["remember me", "Hello from model-a."]
    last = fake_openai.requests_for("model-a")[-1]
    assert [m["content"] for m in last["messages"]][1:] == ["remember me", "Hello from model-a.", "do you?"]


async def test_reset_starts_over_and_never_resurrects_the_old_transcript(
    stack_factory, fake_openai: FakeOpenAI
):
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        first = await collect(client.send("chat:reset", "secret one"))
        reset = await client.unary("ResetSession", ResetSessionRequest(session_key="chat:reset"))
        await collect(client.send("chat:reset", "fresh start"))
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:reset"))
        with pytest.raises(FailedPrecondition) as ended:
            await client.unary("ResetSession", ResetSessionRequest(session_id=first[0].session_id))
    assert reset.previous_session_id == first[0].session_id
    assert reset.session.id != first[0].session_id
    assert [m.content for m in messages.messages] == ["fresh start", "Hello from model-a."]
    assert all("secret one" not in m["content"] for m in fake_openai.requests_for("model-a")[-1]["messages"])
    assert ended.value.reason == "SESSION_ENDED"


async def test_reject_strategy_refuses_while_a_run_is_active(stack_factory, fake_openai: FakeOpenAI):
    fake_openai.script("model-a", Reply(chunks=[f"x{i} " for i in range(20)], delay_between_s=0.05))
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        stream = client.send("chat:busy", "long one")
        first = await anext(stream)
        with pytest.raises(FailedPrecondition) as busy:
            await collect(client.send("chat:busy", "second", strategy=MULTITASK_STRATEGY_REJECT))
        rest = await collect(stream)
    assert busy.value.reason == "SESSION_BUSY"
    assert busy.value.metadata["active_run_id"] == first.run_id
    assert first.run_id in busy.value.message
    assert rest[-1].HasField("completed")


@pytest.mark.parametrize(
    ("call", "code", "reason", "field"),
    [
        ("empty_text", InvalidArgument, "EMPTY_TEXT", "text"),
        ("oversize_text", InvalidArgument, "TEXT_TOO_LONG", "text"),
        ("bad_session_key", InvalidArgument, "INVALID_SESSION_KEY", "session_key"),
        ("unknown_agent", NotFound, "AGENT_NOT_FOUND", "agent_id"),
        ("unknown_session", NotFound, "SESSION_NOT_FOUND", "session_id"),
        ("malformed_session_id", InvalidArgument, "INVALID_ID", "session_id"),
        ("malformed_page_token", InvalidArgument, "INVALID_PAGE_TOKEN", "page_token"),
        ("unknown_run", NotFound, "RUN_NOT_FOUND", "run_id"),
    ],
)
async def test_bad_input_gets_the_right_status_and_reason(stack_factory, call, code, reason, field):
    stack = await stack_factory({"gateway": {"max_text_bytes": 1000}}).start(workers=0)
    async with stack.client() as client:
        actions = {
            "empty_text": lambda: collect(client.send("k", "   ")),
            "oversize_text": lambda: collect(client.send("k", "x" * 1001)),
            "bad_session_key": lambda: collect(client.send("bad key\n", "hi")),
            "unknown_agent": lambda: collect(client.send("k", "hi", agent_id="nobody")),
            "unknown_session": lambda: client.unary(
                "GetSession", GetSessionRequest(session_id=str(uuid.uuid4()))
            ),
            "malformed_session_id": lambda: client.unary("GetSession", GetSessionRequest(session_id="nope")),
            "malformed_page_token": lambda: client.unary(
                "ListSessions", ListSessionsRequest(page_token="garbage")
            ),
            "unknown_run": lambda: client.unary("GetRun", GetRunRequest(run_id=str(uuid.uuid4()))),
        }
        with pytest.raises(code) as error:
            await actions[call]()
        # The service is still fine afterwards.
        sessions = await client.unary("ListSessions", ListSessionsRequest())
    assert isinstance(error.value, RunyardError)
    assert error.value.reason == reason
    assert error.value.field == field
    assert field in error.value.message or reason in ("SESSION_NOT_FOUND", "RUN_NOT_FOUND", "AGENT_NOT_FOUND")
    assert list(sessions.sessions) == []


async def test_pagination_walks_every_session_once(stack_factory):
    stack = await stack_factory().start()
    async with stack.client() as client:
        await asyncio.gather(*(collect(client.send(f"page:{i}", f"m{i}")) for i in range(7)))
        keys: list[str] = []
        token = ""
        pages = 0
        while True:
            page = await client.unary("ListSessions", ListSessionsRequest(page_size=3, page_token=token))
            keys += [s.key for s in page.sessions]
            pages += 1
            token = page.next_page_token
            if not token:
                break
    assert sorted(keys) == sorted(f"page:{i}" for i in range(7))
    assert pages == 3


async def test_concurrent_repeats_of_an_idempotency_key_make_one_run(stack_factory, fake_openai: FakeOpenAI):
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:

        async def first_event(key: str):
            try:
                return await anext(client.send(key, "same text", idempotency_key="dup-1"))
            except RunyardError as exc:
                return exc

        # All at once: the same request six times, and the key reused for four other sessions.
        results = await asyncio.gather(
            *(first_event("chat:dup") for _ in range(6)), *(first_event(f"chat:dup-{i}") for i in range(4))
        )
        runs = await client.unary(
            "GetRun", GetRunRequest(run_id=next(r.run_id for r in results if not isinstance(r, RunyardError)))
        )
    accepted = [r for r in results if not isinstance(r, RunyardError)]
    refused = [r for r in results if isinstance(r, RunyardError)]
    assert len({e.run_id for e in accepted}) == 1  # one run, whoever won
    assert all(isinstance(e, InvalidArgument) and e.reason == "IDEMPOTENCY_KEY_REUSED" for e in refused)
    assert len(refused) in (4, 9)  # the other sessions' requests (or, if one of them won, the rest)
    assert runs.run.idempotency_key == "dup-1"


async def test_two_gateways_share_one_database_and_stream_each_others_runs(
    stack_factory, fake_openai: FakeOpenAI
):
    """The worker is connected to gateway 1 only; a client of gateway 2 sends,
    follows and re-joins: the run is dispatched by gateway 1 and its events
    reach gateway 2 through PostgreSQL (NOTIFY + the events table)."""
    from runyard.client import Client
    from tests.stack import free_port

    fake_openai.script("model-a", Reply(chunks=[f"p{i} " for i in range(12)], delay_between_s=0.02))
    stack = await stack_factory(provider_config(fake_openai)).start()
    port = free_port()
    await stack.spawn(
        "gateway-2",
        "gateway",
        {"gateway": {"listen": f"127.0.0.1:{port}", "internal_listen": f"127.0.0.1:{free_port()}"}},
    )
    await stack.wait_healthy("gateway-2", f"127.0.0.1:{port}")
    async with Client(f"127.0.0.1:{port}") as second, stack.client() as first:
        events = await collect(second.send("chat:two", "across gateways"))
        replay_second = await collect(second.join(events[0].run_id, after_seq=2))
        replay_first = await collect(first.join(events[0].run_id, after_seq=2))
    assert_gap_free(events)
    assert events[-1].HasField("completed")
    assert text_of(events) == "".join(f"p{i} " for i in range(12))
    assert [e.SerializeToString() for e in replay_second] == [e.SerializeToString() for e in events[2:]]
    assert [e.SerializeToString() for e in replay_first] == [e.SerializeToString() for e in events[2:]]
    assert "worker-1 connected" not in stack.logs("gateway-2")  # it really was the other gateway's worker
    # One LISTEN connection per gateway (and the router's): PostgreSQL wakes
    # every listening backend of the database on each NOTIFY.
    conn = await asyncpg.connect(stack.database_url)
    try:
        listening = await conn.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %'"
        )
    finally:
        await conn.close()
    assert len(listening) == 3, [row["query"] for row in listening]


async def test_join_of_a_long_run_through_another_gateway_mid_stream_and_after_completion(
    stack_factory, fake_openai: FakeOpenAI
):
    """A run of hundreds of deltas executes behind gateway 1 (its worker's);
    a client of gateway 2 joins mid-stream and again after the end. Gateway
    1's clients get the deltas from memory; gateway 2 reads the chunks
    gateway 1 stores: both see every seq once, byte for byte the same."""
    from runyard.client import Client
    from tests.stack import free_port

    words = [f"d{i} " for i in range(300)]
    fake_openai.script("model-a", Reply(chunks=words, delay_between_s=0.004))
    stack = await stack_factory(provider_config(fake_openai)).start()
    port = free_port()
    await stack.spawn(
        "gateway-2",
        "gateway",
        {"gateway": {"listen": f"127.0.0.1:{port}", "internal_listen": f"127.0.0.1:{free_port()}"}},
    )
    await stack.wait_healthy("gateway-2", f"127.0.0.1:{port}")
    async with Client(f"127.0.0.1:{port}") as second, stack.client() as first:
        live: list[RunEvent] = []
        joined: list[RunEvent] = []
        join_task = None
        async for event in first.send("chat:long", "count to 300"):
            live.append(event)
            if len(live) == 80:
                join_task = asyncio.create_task(collect(second.join(event.run_id, after_seq=40)))
        assert join_task is not None
        joined = await join_task
        after = await collect(second.join(live[0].run_id, after_seq=0))
        tail = await collect(second.join(live[0].run_id, after_seq=live[-1].seq))
    assert_gap_free(live)
    assert live[-1].HasField("completed") and text_of(live) == "".join(words)
    assert_gap_free(joined, start=41)
    assert [e.SerializeToString() for e in joined] == [e.SerializeToString() for e in live[40:]]
    assert [e.SerializeToString() for e in after] == [e.SerializeToString() for e in live]
    assert tail == []  # joined at the end of a finished run: nothing more, and no wait
    # Stored coalesced: far fewer rows than events.
    rows = await count(
        stack.database_url, f"SELECT count(*) FROM gateway.run_events WHERE run_id = '{live[0].run_id}'"
    )
    assert rows < len(live) / 10, rows
