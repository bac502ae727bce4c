"""Client-side tools (issue 13): a run calls the caller's tools, waits in
``requires_action`` without a worker, and continues when the results arrive,
over Chat or SubmitToolResults, across restarts, with a timeout and org
isolation. The model is the fake OpenAI server emitting tool calls."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request

import asyncpg
import grpc
import pytest

from runyard import FailedPrecondition, InvalidArgument, NotFound, RunyardError
from runyard._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from runyard.gateway.keys import ApiKeyStore
from runyard.v1 import (
    MULTITASK_STRATEGY_REJECT,
    ROLE_ASSISTANT,
    ROLE_TOOL,
    ROLE_USER,
    RUN_STATUS_QUEUED,
    RUN_STATUS_REQUIRES_ACTION,
    CancelRunRequest,
    ChatRequest,
    GetMessagesRequest,
    GetRunRequest,
    RunEvent,
    RunOptions,
    SendMessageRequest,
    SubmitToolResultsRequest,
    ToolDefinition,
    ToolOutput,
)
from tests.fakes.openai_server import FakeOpenAI, Reply, provider_config
from tests.stack import free_port

pytestmark = pytest.mark.timeout(150)

CLOCK = ToolDefinition(
    name="clock",
    description="The current time.",
    parameters_json_schema=json.dumps({"type": "object", "properties": {"tz": {"type": "string"}}}),
)
ADD = ToolDefinition(
    name="add",
    description="a + b.",
    parameters_json_schema=json.dumps(
        {
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        }
    ),
)


def call(call_id: str, name: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def kinds(events: list[RunEvent]) -> list[str]:
    return [e.WhichOneof("event") for e in events]


def assert_gap_free(events: list[RunEvent]) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))


async def until_waiting(events) -> list[RunEvent]:
    """Events up to and including the first ``requires_action``."""
    seen = []
    async for event in events:
        seen.append(event)
        if event.HasField("requires_action"):
            return seen
    raise AssertionError(f"the stream ended without requires_action: {kinds(seen)}")


async def watch(stack, types: tuple[str, ...], count: int) -> list[common_pb2.LifecycleEvent]:
    channel = grpc.aio.insecure_channel(stack.gateway_address)
    stream = gateway_pb2_grpc.GatewayServiceStub(channel).WatchEvents(
        gateway_pb2.WatchEventsRequest(types=list(types))
    )
    events: list[common_pb2.LifecycleEvent] = []
    try:
        while len(events) < count:
            event = await asyncio.wait_for(stream.read(), 20)
            assert event is not grpc.aio.EOF
            events.append(event)
        with pytest.raises(TimeoutError):  # ... and no more
            await asyncio.wait_for(stream.read(), 1.0)
    finally:
        stream.cancel()
        await channel.close()
    return events


async def test_parallel_client_tool_calls_answered_one_by_one_over_chat(
    stack_factory, fake_openai: FakeOpenAI
):
    # One answer calls two client tools and a built-in one (task_output, answered by the worker);
    # the next one calls a client tool again.
    fake_openai.script(
        "model-a",
        Reply(
            chunks=["Checking. "],
            tool_calls=[
                call("call_a", "clock", '{"tz": "UTC"}'),
                call("call_b", "add", '{"a": 2, "b": 2}'),
                call("call_c", "task_output", '{"task_id": "not-a-task"}'),
            ],
        ),
        Reply(chunks=["And Tokyo? "], tool_calls=[call("call_d", "clock", '{"tz": "Asia/Tokyo"}')]),
        Reply(chunks=["It is noon; ", "2 + 2 = 4."]),
    )
    stack = await stack_factory(provider_config(fake_openai)).start(workers=0)
    metrics_port = free_port()
    await stack.add_worker(extra={"worker": {"metrics_port": metrics_port}})
    requests: asyncio.Queue[ChatRequest | None] = asyncio.Queue()

    async def outgoing():
        while (item := await requests.get()) is not None:
            yield item

    def submit(run_id: str, call_id: str, content: str) -> ChatRequest:
        return ChatRequest(
            submit_tool_results=SubmitToolResultsRequest(
                run_id=run_id, results=[ToolOutput(tool_call_id=call_id, content=content)]
            )
        )

    options = RunOptions(client_tools=[CLOCK, ADD], tools_enabled=True)
    await requests.put(
        ChatRequest(send=SendMessageRequest(session_key="tools:chat", text="Time? 2+2?", options=options))
    )
    events: list[RunEvent] = []
    async with stack.client() as client:
        async for event in client.chat(outgoing()):
            events.append(event)
            if event.HasField("requires_action"):
                waiting = [c.id for c in event.requires_action.tool_calls]
                assert waiting in (["call_a", "call_b"], ["call_d"])
                assert event.requires_action.expire_time.seconds > 0
                if waiting == ["call_d"]:
                    await requests.put(submit(event.run_id, "call_d", '{"time": "21:00"}'))
                else:
                    await requests.put(submit(event.run_id, "call_a", '{"time": "12:00"}'))
            elif event.HasField("tool_result") and event.tool_result.tool_call_id == "call_a":
                # One answered, one to go: the run still waits, for call_b only.
                run = (await client.unary("GetRun", GetRunRequest(run_id=event.run_id))).run
                assert run.status == RUN_STATUS_REQUIRES_ACTION
                assert [c.id for c in run.requires_action.tool_calls] == ["call_b"]
                await requests.put(submit(event.run_id, "call_b", "4"))
            elif event.WhichOneof("event") in ("completed", "failed", "cancelled"):
                await requests.put(None)
                break
        assert_gap_free(events)
        assert events[-1].completed.message.content == "It is noon; 2 + 2 = 4."
        calls = [e.tool_call for e in events if e.HasField("tool_call")]
        assert [(c.call.id, c.source) for c in calls] == [
            ("call_a", "client"),
            ("call_b", "client"),
            ("call_c", "builtin"),
            ("call_d", "client"),
        ]
        results = [e.tool_result for e in events if e.HasField("tool_result")]
        assert [(r.tool_call_id, r.source, r.is_error) for r in results] == [
            ("call_c", "builtin", True),
            ("call_a", "client", False),
            ("call_b", "client", False),
            ("call_d", "client", False),
        ]
        assert kinds(events).count("requires_action") == 2
        resumed = [e.started for e in events if e.HasField("started")]
        assert [(s.attempt, s.resumed) for s in resumed] == [(1, False), (2, True), (3, True)]

        # The model was asked once per step: each time with every result so far, in the order of the calls.
        first, second, third = fake_openai.requests_for("model-a")
        assert third["messages"][-2]["tool_calls"][0]["id"] == "call_d"
        assert third["messages"][-1] == {
            "role": "tool",
            "tool_call_id": "call_d",
            "content": '{"time": "21:00"}',
        }
        assert {t["function"]["name"] for t in first["tools"]} == {
            "clock",
            "add",
            "spawn_task",
            "task_output",
        }
        tail = second["messages"][-4:]
        assert [m["role"] for m in tail] == ["assistant", "tool", "tool", "tool"]
        assert [m["tool_call_id"] for m in tail[1:]] == ["call_a", "call_b", "call_c"]
        assert [m["content"] for m in tail[1:3]] == ['{"time": "12:00"}', "4"]

        # The transcript: the run's messages once, tool calls and results in pairs.
        messages = (await client.unary("GetMessages", GetMessagesRequest(session_key="tools:chat"))).messages
        assert [m.role for m in messages] == [
            ROLE_USER,
            ROLE_ASSISTANT,
            ROLE_TOOL,
            ROLE_TOOL,
            ROLE_TOOL,
            ROLE_ASSISTANT,
            ROLE_TOOL,
            ROLE_ASSISTANT,
        ]
        assert [c.id for c in messages[1].tool_calls] == ["call_a", "call_b", "call_c"]
        assert [m.tool_call_id for m in messages if m.role == ROLE_TOOL] == [
            "call_a",
            "call_b",
            "call_c",
            "call_d",
        ]
        assert messages[-1].content == "It is noon; 2 + 2 = 4."

    lifecycle = await watch(stack, ("tool.called", "tool.completed"), 8)
    assert sorted((e.type, e.tool.tool_call_id, e.tool.source) for e in lifecycle) == [
        ("tool.called", "call_a", "client"),
        ("tool.called", "call_b", "client"),
        ("tool.called", "call_c", "builtin"),
        ("tool.called", "call_d", "client"),
        ("tool.completed", "call_a", "client"),
        ("tool.completed", "call_b", "client"),
        ("tool.completed", "call_c", "builtin"),
        ("tool.completed", "call_d", "client"),
    ]
    assert all(e.run_id == events[0].run_id for e in lifecycle)

    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    )
    assert 'runyard_tool_calls_total{outcome="ok",source="client",tool="clock"} 2.0' in text
    assert 'runyard_tool_calls_total{outcome="error",source="builtin",tool="task_output"} 1.0' in text
    assert 'runyard_tool_call_duration_seconds_count{source="client",tool="add"} 1.0' in text


async def _keys(url: str) -> dict[str, str]:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    try:
        store = ApiKeyStore(pool)
        scopes = ["chat", "sessions:read", "sessions:admin", "events"]
        return {org: (await store.create(f"org-{org}", org, scopes))[1] for org in ("a", "b")}
    finally:
        await pool.close()


async def test_a_waiting_run_survives_a_worker_kill_and_a_gateway_restart_then_completes_once(
    stack_factory, fake_openai: FakeOpenAI, migrated_url: str
):
    fake_openai.script(
        "model-a", Reply(tool_calls=[call("call_1", "clock")]), Reply(chunks=["It is ", "noon."])
    )
    stack = await stack_factory({**provider_config(fake_openai), "auth": {"anonymous": False}}).start()
    keys = await _keys(migrated_url)
    async with stack.client(keys["a"]) as a:
        before = await until_waiting(a.send("tools:restart", "What time is it?", client_tools=[CLOCK]))
    run_id = before[-1].run_id
    assert before[-1].requires_action.tool_calls[0].name == "clock"

    # Nothing of the wait lives in a process: kill -9 the worker, restart the gateway, start a new worker.
    await stack.stop("worker-1", signal.SIGKILL)
    await stack.stop("gateway")
    await stack.start_service("gateway")
    await stack.add_worker()

    async with stack.client(keys["a"]) as a, stack.client(keys["b"]) as b:
        # A client that reconnects sees the pending call again.
        joined: list[RunEvent] = []

        async def follow() -> None:
            async for event in a.join(run_id, 0):
                joined.append(event)

        follower = asyncio.create_task(follow())
        run = (await a.unary("GetRun", GetRunRequest(run_id=run_id))).run
        assert run.status == RUN_STATUS_REQUIRES_ACTION
        assert [c.id for c in run.requires_action.tool_calls] == ["call_1"]

        # Another org's run does not exist; an unknown call id is named.
        with pytest.raises(NotFound) as other_org:
            await b.submit_tool_results(run_id, [ToolOutput(tool_call_id="call_1", content="12:00")])
        assert other_org.value.reason == "RUN_NOT_FOUND"
        with pytest.raises(InvalidArgument) as unknown:
            await a.submit_tool_results(run_id, [ToolOutput(tool_call_id="call_9", content="12:00")])
        assert (
            unknown.value.reason == "UNKNOWN_TOOL_CALL" and unknown.value.field == "results[0].tool_call_id"
        )
        assert "call_1" in unknown.value.message

        answered = await a.submit_tool_results(run_id, [ToolOutput(tool_call_id="call_1", content="12:00")])
        assert answered.status == RUN_STATUS_QUEUED and not answered.requires_action.tool_calls
        await asyncio.wait_for(follower, 30)

        assert_gap_free(joined)
        assert [e.seq for e in joined[: len(before)]] == [e.seq for e in before]
        assert kinds(joined).count("requires_action") == 1 and kinds(joined).count("completed") == 1
        assert joined[-1].completed.message.content == "It is noon."
        assert len(fake_openai.requests_for("model-a")) == 2  # no model call repeated

        # A repeat of the same results is answered again; a different one is refused.
        again = await a.submit_tool_results(run_id, [ToolOutput(tool_call_id="call_1", content="12:00")])
        assert again.id == run_id
        with pytest.raises(FailedPrecondition) as ended:
            await a.submit_tool_results(run_id, [ToolOutput(tool_call_id="call_1", content="13:00")])
        assert ended.value.reason == "RUN_ENDED"

        messages = (await a.unary("GetMessages", GetMessagesRequest(session_key="tools:restart"))).messages
        assert [m.role for m in messages] == [ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL, ROLE_ASSISTANT]
        assert messages[2].content == "12:00" and messages[2].tool_call_id == "call_1"
    conn = await asyncpg.connect(migrated_url)
    try:  # one transcript commit
        assert await conn.fetchval("SELECT count(*) FROM sessions.turns WHERE run_id = $1::uuid", run_id) == 1
    finally:
        await conn.close()


async def test_a_waiting_run_holds_its_session_times_out_or_is_cancelled(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.script(
        "model-a",
        Reply(tool_calls=[call("call_x", "clock")]),  # run X (times out)
        Reply(tool_calls=[call("call_z", "clock")]),  # run Z (cancelled)
        Reply(chunks=["Done."]),  # run Y, queued behind X
    )
    config = provider_config(fake_openai)
    config["providers"]["echo"] = {"type": "echo"}
    config["gateway"] = {"tool_results_timeout_s": 3}
    stack = await stack_factory(config).start()
    async with stack.client() as client:
        x_events = client.send("tools:slow", "What time is it?", client_tools=[CLOCK])
        x_run = (await until_waiting(x_events))[-1].run_id
        # The waiting run is the session's active run: the next message queues behind it ...
        y_events = client.send("tools:slow", "Anything else?")
        y_first = await anext(y_events)
        assert y_first.queued.position == 1
        with pytest.raises(FailedPrecondition) as busy:
            [e async for e in client.send("tools:slow", "now!", strategy=MULTITASK_STRATEGY_REJECT)]
        assert busy.value.reason == "SESSION_BUSY"

        # ... CancelRun ends a waiting run at once ...
        z_events = client.send("tools:cancel", "What time is it?", client_tools=[CLOCK])
        z_run = (await until_waiting(z_events))[-1].run_id
        await client.unary("CancelRun", CancelRunRequest(run_id=z_run, reason="never mind"))
        z_rest = [e async for e in z_events]
        assert z_rest[-1].cancelled.reason == "never mind"

        # ... and without results it fails after gateway.tool_results_timeout_s; then Y runs.
        x_rest = [e async for e in x_events]
        error = x_rest[-1].failed.error
        assert (error.code, error.reason) == ("DEADLINE_EXCEEDED", "TOOL_RESULTS_TIMEOUT")
        assert "call_x" in error.message and "gateway.tool_results_timeout_s" in error.message
        y_rest = [e async for e in y_events]
        assert y_rest[-1].completed.message.content == "Done."
        with pytest.raises(FailedPrecondition) as late:
            await client.submit_tool_results(x_run, [ToolOutput(tool_call_id="call_x", content="12:00")])
        assert late.value.reason == "RUN_ENDED"

        # Bad declarations are refused when the message is sent.
        for tools, reason in (
            ([ToolDefinition(name="spawn_task")], "TOOL_NAME_RESERVED"),
            ([CLOCK, CLOCK], "DUPLICATE_TOOL_NAME"),
            ([ToolDefinition(name="bad name")], "INVALID_TOOL_NAME"),
            ([ToolDefinition(name="x", parameters_json_schema="[1]")], "INVALID_TOOL_SCHEMA"),
        ):
            with pytest.raises(RunyardError) as refused:
                [e async for e in client.send("tools:bad", "hi", client_tools=tools)]
            assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, reason)

    # `runyard send --demo-tools`: the CLI answers the calculator call on this
    # machine (echo calls a tool on /tool).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "send",
        "--gateway",
        stack.gateway_address,
        "--session",
        "tools:cli",
        "--model",
        "echo/echo",
        "--demo-tools",
        '/tool calculator {"expression": "6 * (3 + 4)"}',
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, err.decode()
    assert out.decode() == 'echo: tool result: {"expression": "6 * (3 + 4)", "result": 42}\n'
    assert (
        '[tool calculator {"expression": "6 * (3 + 4)"} -> {"expression": "6 * (3 + 4)", "result": 42}]'
        in err.decode()
    )
