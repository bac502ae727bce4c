"""Operations (issue 5): handshake timeout, cancellation latency, multitask
strategies, and SIGTERM of every service under load."""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time

import grpc
import pytest

from runyard import RunyardError
from runyard.common.errors import from_rpc_error
from runyard.v1 import (
    MULTITASK_STRATEGY_COLLECT,
    MULTITASK_STRATEGY_INTERRUPT,
    RUN_STATUS_CANCELLED,
    CancelRunRequest,
    ChatRequest,
    ConnectRequest,
    GetMessagesRequest,
    GetRunRequest,
    ListRunsRequest,
    RunEvent,
    SendMessageRequest,
    WorkerHubServiceStub,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, provider_config
from tests.stack import INTERNAL_SECRET
from tests.support import collect, text_of

pytestmark = pytest.mark.timeout(120)


async def test_a_silent_worker_is_dropped_after_the_handshake_timeout(stack_factory):
    stack = await stack_factory({"gateway": {"handshake_timeout_ms": 1000}}).start(workers=0)
    async with grpc.aio.insecure_channel(stack.gateway_internal_address) as channel:
        hub = WorkerHubServiceStub(channel)
        silence = asyncio.Event()

        async def nothing():
            await silence.wait()
            yield ConnectRequest()

        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as dropped:
            await collect(hub.Connect(nothing(), metadata=(("x-runyard-internal", INTERNAL_SECRET),)))
        elapsed = time.monotonic() - started
        silence.set()
    error = from_rpc_error(dropped.value)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == "HANDSHAKE_TIMEOUT"
    assert "handshake_timeout_ms" in error.message
    assert 0.9 < elapsed < 3.0
    # A real worker still gets in afterwards.
    await stack.add_worker()


async def test_an_invalid_handshake_timeout_stops_the_gateway_with_a_clear_message(stack_factory):
    stack = stack_factory()
    env = stack.env()
    env["RUNYARD_HANDSHAKE_TIMEOUT_MS"] = "-5"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "serve",
        "gateway",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"gateway.handshake_timeout_ms: must be positive, got -5" in err
    assert b"RUNYARD_HANDSHAKE_TIMEOUT_MS" in err


async def test_cancel_reaches_the_provider_promptly_and_leaves_no_snapshot(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script("model-a", Reply(chunks=["partial ", "answer ", "never ", "finished"], stall_after=2))
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        stream = client.send("chat:cancel", "take your time")
        events = []
        async for event in stream:
            events.append(event)
            if "answer " in text_of(events):  # the two chunks before the stall
                break
        requested = time.monotonic()
        await client.unary("CancelRun", CancelRunRequest(run_id=events[0].run_id, reason="user pressed stop"))
        assert await asyncio.to_thread(fake_openai.client_gone.wait, 5)
        latency = fake_openai.client_gone_at - requested
        rest = await collect(stream)
        run = await client.unary("GetRun", GetRunRequest(run_id=events[0].run_id))
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:cancel"))
    # The 100 ms target is a latency figure (measured 4-8 ms on an idle machine, see the
    # closing notes); the test allows for a loaded CI machine and checks that the cancel
    # reaches the provider promptly rather than after a timeout or the end of the answer.
    assert latency < 1.0, f"provider stream cancelled {latency * 1000:.0f} ms after CancelRun"
    assert rest[-1].HasField("cancelled")
    assert [e.seq for e in events + rest] == list(range(1, len(events) + len(rest) + 1))
    assert run.run.status == RUN_STATUS_CANCELLED
    assert list(messages.messages) == []


async def test_cancel_on_the_chat_stream(stack_factory, fake_openai: FakeOpenAI):
    fake_openai.script("model-a", Reply(chunks=["a ", "b ", "c"], stall_after=1))
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        outgoing: asyncio.Queue[ChatRequest | None] = asyncio.Queue()

        async def requests():
            while (item := await outgoing.get()) is not None:
                yield item

        await outgoing.put(ChatRequest(send=SendMessageRequest(session_key="chat:bidi", text="hi")))
        seen: list[RunEvent] = []
        async for event in client.stub.Chat(requests()):
            seen.append(event)
            if event.HasField("text_delta"):
                await outgoing.put(ChatRequest(cancel=CancelRunRequest(run_id=event.run_id)))
            if event.HasField("cancelled"):
                await outgoing.put(None)
    assert seen[-1].HasField("cancelled")
    assert text_of(seen) == "a "


async def test_interrupt_cancels_the_active_run_and_keeps_its_partial_answer_out(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script(
        "model-a", Reply(chunks=["long ", "winded ", "answer"], stall_after=2), Reply(chunks=["ok"])
    )
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        first = client.send("chat:int", "tell me everything")
        first_events = []
        async for event in first:
            first_events.append(event)
            if "winded " in text_of(first_events):  # the two chunks before the stall
                break
        second = await collect(client.send("chat:int", "never mind", strategy=MULTITASK_STRATEGY_INTERRUPT))
        first_events += await collect(first)
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:int"))
    assert first_events[-1].HasField("cancelled")
    assert second[-1].HasField("completed")
    assert [m.content for m in messages.messages] == ["never mind", "ok"]
    assert all("winded" not in m["content"] for m in fake_openai.requests_for("model-a")[-1]["messages"])


async def test_collect_merges_messages_that_arrive_while_a_run_is_active(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script(
        "model-a", Reply(chunks=[f"w{i} " for i in range(10)], delay_between_s=0.1), Reply(chunks=["both"])
    )
    stack = await stack_factory(provider_config(fake_openai)).start()
    async with stack.client() as client:
        active = client.send("chat:col", "first question")
        first = await anext(active)
        follow_a = client.send("chat:col", "also this", strategy=MULTITASK_STRATEGY_COLLECT)
        a0 = await anext(follow_a)
        follow_b = client.send("chat:col", "and that", strategy=MULTITASK_STRATEGY_COLLECT)
        b0 = await anext(follow_b)
        a_rest, b_rest, _ = await asyncio.gather(collect(follow_a), collect(follow_b), collect(active))
        runs = await client.unary("ListRuns", ListRunsRequest(session_key="chat:col"))
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:col"))
    assert a0.run_id == b0.run_id != first.run_id
    assert a_rest[-1].HasField("completed") and b_rest[-1].HasField("completed")
    assert len(runs.runs) == 2
    request = fake_openai.requests_for("model-a")[-1]
    assert [m["content"] for m in request["messages"][-2:]] == ["also this", "and that"]
    assert [m.content for m in messages.messages][-3:] == ["also this", "and that", "both"]


async def test_enqueue_runs_in_order_of_arrival(stack_factory, fake_openai: FakeOpenAI):
    fake_openai.default("model-a", Reply(chunks=["ack"], delay_between_s=0.02))
    stack = await stack_factory(provider_config(fake_openai)).start(workers=2)
    async with stack.client() as client:
        streams, firsts = [], []
        for i in range(5):  # each accepted (queued event seen) before the next is sent
            streams.append(client.send("chat:order", f"message {i}"))
            firsts.append(await anext(streams[-1]))
        await asyncio.gather(*(collect(s) for s in streams))
        messages = await client.unary("GetMessages", GetMessagesRequest(session_key="chat:order"))
    assert len({f.run_id for f in firsts}) == 5
    users = [m.content for m in messages.messages if m.content.startswith("message")]
    assert users == [f"message {i}" for i in range(5)]


async def test_sigterm_of_each_service_under_load_loses_and_duplicates_nothing(
    stack_factory, fake_openai: FakeOpenAI
):
    """20 sessions keep sending; each service in turn gets SIGTERM and comes back."""
    fake_openai.default("model-a", Reply(chunks=[f"t{i} " for i in range(8)], delay_between_s=0.03))
    # No rate limit: 20 clients retrying while a service restarts exceed the default 50 rps.
    stack = await stack_factory({**provider_config(fake_openai), "gateway": {"rate_limit_rps": 0}}).start(
        workers=2
    )
    stop = asyncio.Event()
    accepted: dict[str, list[RunEvent]] = {}
    sent: dict[str, list[str]] = {}

    async def follow(client, run_id: str, after: int, events: list[RunEvent]) -> None:
        while True:
            try:
                async for event in client.join(run_id, after):
                    assert event.seq == after + 1, (run_id, event.seq, after)
                    events.append(event)
                    after = event.seq
                return
            except RunyardError as exc:
                assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                await asyncio.sleep(0.2)

    async def session(index: int) -> None:
        key = f"load:{index}"
        sent[key] = []
        async with stack.client() as client:
            n = 0
            while not stop.is_set():
                n += 1
                text = f"{key} message {n}"
                idem = f"{key}:{n}"
                events: list[RunEvent] = []
                while True:  # submit until accepted (idempotent)
                    try:
                        stream = client.send(key, text, idempotency_key=idem)
                        first = await anext(stream)
                        break
                    except RunyardError as exc:
                        assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                        await asyncio.sleep(0.2 + random.random() * 0.2)
                assert first.seq == 1
                events.append(first)
                sent[key].append(text)
                accepted[first.run_id] = events
                try:
                    async for event in stream:
                        assert event.seq == events[-1].seq + 1
                        events.append(event)
                except RunyardError as exc:
                    assert exc.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                if events[-1].WhichOneof("event") not in ("completed", "failed", "cancelled"):
                    await follow(client, first.run_id, events[-1].seq, events)

    clients = [asyncio.create_task(session(i)) for i in range(20)]
    try:
        await asyncio.sleep(1.5)
        for name in ("worker-1", "gateway", "router", "sessions"):
            assert await stack.stop(name, signal.SIGTERM, timeout_s=15) == 0, stack.logs(name)[-3000:]
            await asyncio.sleep(0.5)
            if name.startswith("worker"):
                await stack.add_worker()
            else:
                await stack.start_service(name)
            await asyncio.sleep(1.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 60)
    finally:
        stop.set()
        for task in clients:
            task.cancel()

    assert len(accepted) > 60
    for run_id, events in accepted.items():
        terminal = [e for e in events if e.WhichOneof("event") in ("completed", "failed", "cancelled")]
        assert len(terminal) == 1 and events[-1] is terminal[0], run_id
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), run_id
        assert terminal[0].HasField("completed"), (run_id, terminal[0])
    async with stack.client() as client:
        for key, texts in sent.items():
            runs = await client.unary("ListRuns", ListRunsRequest(session_key=key, page_size=1000))
            assert len(runs.runs) == len(texts), key  # no duplicate runs
            messages = await client.unary("GetMessages", GetMessagesRequest(session_key=key, page_size=1000))
            users = [m.content for m in messages.messages if m.content.startswith(key)]
            assert users == texts, key  # every accepted message once, in order
