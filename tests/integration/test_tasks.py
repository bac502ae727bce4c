"""Background tasks end to end (issue 6, DESIGN.md section 7): real service
processes, real PostgreSQL, the echo provider and the fake OpenAI server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import jwt
import pytest

from runyard import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from runyard._proto.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from runyard.common.auth import internal_metadata, load_private_key
from runyard.common.errors import from_rpc_error
from runyard.gateway.keys import ApiKeyStore
from runyard.v1 import (
    ROLE_ASSISTANT,
    ROLE_SYSTEM,
    ROLE_TOOL,
    ROLE_USER,
    RUN_STATUS_CANCELLED,
    RUN_STATUS_COMPLETED,
    TASK_STATUS_CANCELLED,
    TASK_STATUS_COMPLETED,
    TASK_STATUS_ERROR,
    TASK_STATUS_PENDING,
    TASK_STATUS_RUNNING,
    CancelRunRequest,
    CancelTaskRequest,
    DeleteSessionRequest,
    GetMessagesRequest,
    GetRunRequest,
    GetTaskRequest,
    ListRunsRequest,
    ListSessionsRequest,
    ListTasksRequest,
    ResetSessionRequest,
    SpawnTaskRequest,
    Task,
)
from tests.fakes.openai_server import FakeOpenAI, Reply
from tests.stack import INTERNAL_SECRET, RUN_TOKEN_SECRET, free_port
from tests.support import collect

pytestmark = pytest.mark.timeout(90)

ENDED = (TASK_STATUS_COMPLETED, TASK_STATUS_ERROR, TASK_STATUS_CANCELLED, common_pb2.TASK_STATUS_INTERRUPTED)


def config(tasks: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Stack config with short task timers."""
    base = {"notify_batch_window_ms": 1000, "sweep_interval_ms": 100}
    return {"tasks": {**base, **(tasks or {})}, **extra}


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0, interval_s: float = 0.1
) -> Any:
    """The first truthy result of ``check()``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s (last: {result!r})")
        await asyncio.sleep(interval_s)


async def get_task(client, task_id: str) -> Task:
    return (await client.unary("GetTask", GetTaskRequest(task_id=task_id))).task


async def wait_ended(client, task_id: str, timeout_s: float = 20.0) -> Task:
    async def ended() -> Task | None:
        task = await get_task(client, task_id)
        return task if task.status in ENDED else None

    return await eventually(ended, timeout_s)


async def spawn(client, parent_session_id: str, prompt: str, **fields: Any) -> Task:
    request = SpawnTaskRequest(parent_session_id=parent_session_id, prompt=prompt, **fields)
    return (await client.unary("SpawnTask", request)).task


async def start_parent(client, key: str) -> str:
    """Create a session by talking to it; returns its id."""
    events = await collect(client.send(key, "hello"))
    assert events[-1].HasField("completed")
    return events[0].session_id


async def quiet_parent(stack, key: str, agent_id: str) -> str:
    """A parent session created without a model call (through the sessions service)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['sessions']}") as channel:
        response = await sessions_pb2_grpc.SessionServiceStub(channel).ResolveSession(
            sessions_pb2.ResolveSessionRequest(org_id="default", session_key=key, agent_id=agent_id),
            metadata=internal_metadata(INTERNAL_SECRET),
        )
    return response.session.id


async def runyard_cli(stack, *args: str) -> str:
    """Run the ``runyard`` command against the stack's gateway; returns stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        args[0],
        "--gateway",
        stack.gateway_address,
        *args[1:],
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


def notifications(messages) -> list[common_pb2.Message]:
    return [
        m for m in messages if m.role == ROLE_SYSTEM and m.metadata.get("runyard.notification") == "tasks"
    ]


async def transcript(client, session_id: str) -> list[common_pb2.Message]:
    return list(
        (
            await client.unary("GetMessages", GetMessagesRequest(session_id=session_id, page_size=1000))
        ).messages
    )


async def runs_of(client, session_id: str) -> list[common_pb2.Run]:
    return list((await client.unary("ListRuns", ListRunsRequest(session_id=session_id, page_size=1000))).runs)


def seconds(ts) -> float:
    return ts.ToNanoseconds() / 1e9


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals [start, end) open at one instant."""
    points = sorted(
        [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda p: (p[0], p[1])
    )
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


async def watch(stack, types: tuple[str, ...], *, quiet_s: float = 1.0) -> list[common_pb2.LifecycleEvent]:
    """Every lifecycle event of ``types`` so far (replay until quiet)."""
    channel = grpc.aio.insecure_channel(stack.gateway_address)
    call = gateway_pb2_grpc.GatewayServiceStub(channel).WatchEvents(
        gateway_pb2.WatchEventsRequest(types=list(types))
    )
    events = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(call.read(), quiet_s)
            except TimeoutError:
                break
            if event is grpc.aio.EOF:
                break
            events.append(event)
    finally:
        call.cancel()
        await channel.close()
    return events


async def scrape(port: int) -> str:
    """The text of a /metrics endpoint."""

    def get() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    return await asyncio.to_thread(get)


async def db_fetch(stack, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(stack.database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


# ---------------------------------------------------------------- concurrency


async def test_a_limit_of_two_runs_six_tasks_two_at_a_time_in_spawn_order(stack_factory):
    metrics_port = free_port()
    stack = await stack_factory(
        config(
            # A slow sweep: only the transaction that frees a slot can hand it on quickly.
            {"concurrency": {"models": {"echo/echo": 2}}, "sweep_interval_ms": 5000},
            providers={"echo": {"type": "echo", "echo_delay_ms": 40}},
            gateway={"metrics_port": metrics_port},
        )
    ).start()
    async with stack.client() as client:
        parent = await start_parent(client, "conc:parent")
        spawned = [
            await spawn(client, parent, f"task {i} " + "word " * 8, description=f"task {i}") for i in range(6)
        ]
        assert [t.status for t in spawned[:2]] == [TASK_STATUS_RUNNING] * 2  # a free slot: running at once
        assert [t.status for t in spawned[2:]] == [TASK_STATUS_PENDING] * 4
        done = [await wait_ended(client, t.id) for t in spawned]
        runs = [await runs_of(client, t.session_id) for t in done]

    assert [t.status for t in done] == [TASK_STATUS_COMPLETED] * 6
    assert [t.result for t in done] == [f"echo: task {i} " + "word " * 8 for i in range(6)]
    assert {t.concurrency_key for t in done} == {"model:echo/echo"}
    slots = [(seconds(t.start_time), seconds(t.end_time)) for t in done]
    assert max_overlap(slots) == 2
    # FIFO: slots were granted in spawn order ...
    starts = [start for start, _ in slots]
    assert starts == sorted(starts) and len(set(starts[2:])) == 4
    # ... each one in the transaction that freed it, at once.
    ends = [end for _, end in slots]
    assert all(any(0 <= start - end < 0.5 for end in ends) for start in starts[2:])
    # The runs themselves (on a worker with 4 free slots) never overlapped more.
    executions = [(seconds(r.start_time), seconds(r.end_time)) for rs in runs for r in rs]
    assert len(executions) == 6 and max_overlap(executions) <= 2
    assert 'runyard_task_slots_in_use{key="model:echo/echo"} 0.0' in await scrape(metrics_port)


# ---------------------------------------------------------------- notifications


async def test_a_sub_second_task_notifies_its_parent_exactly_once(stack_factory):
    stack = await stack_factory(config({"notify_batch_window_ms": 500})).start()
    async with stack.client() as client:
        parent = await start_parent(client, "once:parent")
        task = await spawn(client, parent, "quick job", description="quick")
        task = await wait_ended(client, task.id)
        assert task.status == TASK_STATUS_COMPLETED
        assert seconds(task.end_time) - seconds(task.create_time) < 5.0  # about 0.1 s on an idle machine

        async def delivered() -> list[common_pb2.Message] | None:
            runs = await runs_of(client, parent)
            if len(runs) == 2 and runs[-1].status == RUN_STATUS_COMPLETED:
                return await transcript(client, parent)
            return None

        messages = await eventually(delivered)
        await asyncio.sleep(1.5)  # > the batch window and many sweeps: nothing else arrives
        runs = await runs_of(client, parent)
        again = await transcript(client, parent)
    events = await watch(stack, ("task.spawned", "task.started", "task.completed"))

    notes = notifications(again)
    assert len(notes) == 1 and again == messages
    note = notes[0]
    assert note.metadata["task_ids"] == task.id and note.metadata["all_complete"] == "true"
    assert f'Task {task.id} "quick": COMPLETED after' in note.content
    assert "Result: echo: quick job" in note.content
    assert "All background tasks are complete (1 task; 0 failed)." in note.content
    # One run started to deliver it, and it answered the notification.
    assert len(runs) == 2 and runs[1].metadata["runyard.trigger"] == "task_notification"
    assert [m.role for m in again] == [ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM, ROLE_ASSISTANT]
    assert again[-1].content.startswith("echo: Background task update: 1 task finished.")
    assert [(e.type, e.task.task.status) for e in events if e.task_id == task.id] == [
        ("task.spawned", TASK_STATUS_PENDING),
        ("task.started", TASK_STATUS_RUNNING),
        ("task.completed", TASK_STATUS_COMPLETED),
    ]
    rows = await db_fetch(stack, "SELECT state FROM gateway.task_notifications")
    assert [r["state"] for r in rows] == ["delivered"]


async def test_an_all_complete_message_for_a_busy_parent_rides_with_its_next_run(stack_factory):
    stack = await stack_factory(config(providers={"echo": {"type": "echo", "echo_delay_ms": 100}})).start()
    async with stack.client() as client:
        parent = await start_parent(client, "busy:parent")
        long_turn = asyncio.create_task(collect(client.send("busy:parent", "w " * 40)))  # about 4 s

        async def parent_running() -> bool:
            return any(r.status == common_pb2.RUN_STATUS_RUNNING for r in await runs_of(client, parent))

        await eventually(parent_running)
        task = await spawn(client, parent, "quick", description="quick")
        assert (await wait_ended(client, task.id)).status == TASK_STATUS_COMPLETED

        async def batched() -> list[asyncpg.Record]:
            return await db_fetch(stack, "SELECT state FROM gateway.task_notifications")

        assert [r["state"] for r in await eventually(batched)] == ["pending"]
        await asyncio.sleep(0.5)  # sweeps: no run is started for it while the parent's runs
        assert len(await runs_of(client, parent)) == 2
        next_turn = asyncio.create_task(collect(client.send("busy:parent", "and now?")))
        assert (await long_turn)[-1].HasField("completed")
        assert (await next_turn)[-1].completed.message.content == "echo: and now?"
        await asyncio.sleep(1.0)
        runs = await runs_of(client, parent)
        messages = await transcript(client, parent)

    assert len(runs) == 3 and not any("runyard.trigger" in r.metadata for r in runs)
    assert [m.role for m in messages] == [
        ROLE_USER,
        ROLE_ASSISTANT,
        ROLE_USER,
        ROLE_ASSISTANT,
        ROLE_SYSTEM,
        ROLE_USER,
        ROLE_ASSISTANT,
    ]
    assert messages[4].metadata["all_complete"] == "true" and messages[4].run_id == runs[2].id
    rows = await db_fetch(stack, "SELECT state, run_id FROM gateway.task_notifications")
    assert [(r["state"], str(r["run_id"])) for r in rows] == [("delivered", runs[2].id)]


async def test_three_siblings_ending_close_together_give_one_notification_and_one_parent_run(stack_factory):
    stack = await stack_factory(
        config(
            {"notify_batch_window_ms": 3000},
            providers={"echo": {"type": "echo", "echo_delay_ms": 60}},
            agents={"broken": {"model": "echo/fail-400"}},
        )
    ).start()
    async with stack.client() as client:
        parent = await start_parent(client, "batch:parent")
        tasks = [
            await spawn(client, parent, "a b c d e f", description="six words"),
            await spawn(client, parent, "a b", description="two words"),
            await spawn(client, parent, "doomed", description="broken model", agent_id="broken"),
        ]
        done = [await wait_ended(client, t.id) for t in tasks]

        async def delivered() -> list[common_pb2.Run] | None:
            runs = await runs_of(client, parent)
            return runs if len(runs) == 2 and runs[-1].status == RUN_STATUS_COMPLETED else None

        await eventually(delivered)
        await asyncio.sleep(1.5)
        runs = await runs_of(client, parent)
        messages = await transcript(client, parent)

    assert [t.status for t in done] == [TASK_STATUS_COMPLETED, TASK_STATUS_COMPLETED, TASK_STATUS_ERROR]
    ends = sorted(seconds(t.end_time) for t in done)
    assert ends[-1] - ends[0] > 0.1  # they did not end at the same instant ...
    notes = notifications(messages)
    assert len(notes) == 1  # ... yet one message tells of all three
    assert set(notes[0].metadata["task_ids"].split(",")) == {t.id for t in tasks}
    assert notes[0].content.startswith("Background task update: 3 tasks finished.")
    assert "All background tasks are complete (3 tasks; 1 failed)." in notes[0].content
    assert f'Task {tasks[2].id} "broken model": ERROR after' in notes[0].content
    assert len(runs) == 2  # the user's and one "all complete" run

    # The command line shows the same.
    listed = await runyard_cli(stack, "tasks", "list", "--session", "batch:parent")
    assert [line.split()[:2] for line in listed.splitlines()] == [
        [tasks[0].id, "COMPLETED"],
        [tasks[1].id, "COMPLETED"],
        [tasks[2].id, "ERROR"],
    ]
    shown = json.loads(await runyard_cli(stack, "tasks", "show", tasks[2].id))
    assert shown["status"] == "ERROR" and shown["error"].startswith(done[2].error.reason)


# ---------------------------------------------------------------- cascade


async def test_deleting_a_parent_cancels_a_three_level_tree_and_frees_every_slot(stack_factory):
    metrics_port = free_port()
    stack = await stack_factory(
        config(
            {"concurrency": {"models": {"echo/echo": 2}}, "sweep_interval_ms": 5000},
            providers={"echo": {"type": "echo", "echo_delay_ms": 150}},
            gateway={"metrics_port": metrics_port},
        )
    ).start()
    slow = "w " * 60  # about 9 s of streaming
    async with stack.client() as client:
        parent = await start_parent(client, "tree:parent")
        other = await start_parent(client, "tree:other")
        a = await spawn(client, parent, slow, description="A")
        b = await spawn(client, a.session_id, slow, description="B")  # a subtask of A
        c = await spawn(client, b.session_id, slow, description="C")  # of B: depth 3
        d = await spawn(client, a.session_id, slow, description="D")
        outsider = await spawn(client, other, "short job", description="outsider")
        assert (a.depth, b.depth, c.depth, d.depth) == (1, 2, 3, 2)
        assert (b.parent_task_id, c.parent_task_id, d.parent_task_id) == (a.id, b.id, a.id)
        assert [t.status for t in (a, b, c, d, outsider)] == [TASK_STATUS_RUNNING] * 2 + [
            TASK_STATUS_PENDING
        ] * 3
        children = await client.unary("ListSessions", ListSessionsRequest(parent_session_id=a.session_id))
        assert {s.id for s in children.sessions} == {b.session_id, d.session_id}

        await client.unary("DeleteSession", DeleteSessionRequest(session_id=parent))
        # The cascade is done when DeleteSession returns.
        tree = [await get_task(client, t.id) for t in (a, b, c, d)]
        assert [t.status for t in tree] == [TASK_STATUS_CANCELLED] * 4
        assert {t.error.reason for t in tree} == {"PARENT_SESSION_DELETED"}
        # Every slot went to the next waiter: the outsider runs and completes.
        outsider = await wait_ended(client, outsider.id)
        assert outsider.status == TASK_STATUS_COMPLETED
        assert 0 <= seconds(outsider.start_time) - max(seconds(t.end_time) for t in tree) < 0.5

        async def runs_cancelled() -> bool:
            statuses = [
                (await client.unary("GetRun", GetRunRequest(run_id=t.run_id))).run.status for t in tree[:2]
            ]
            return statuses == [RUN_STATUS_CANCELLED] * 2

        await eventually(runs_cancelled, 10)
        assert [t.run_id for t in tree[2:]] == ["", ""]  # C and D never ran

    held = await db_fetch(stack, "SELECT count(*) AS n FROM gateway.tasks WHERE slot_held OR wants_slot")
    assert held[0]["n"] == 0
    assert 'runyard_task_slots_in_use{key="model:echo/echo"} 0.0' in await scrape(metrics_port)
    # The deleted parent is told nothing; nor is any task of the tree.
    rows = await db_fetch(
        stack,
        "SELECT count(*) AS n FROM gateway.task_notifications WHERE parent_session_id <> $1",
        uuid.UUID(other),
    )
    assert rows[0]["n"] == 0


async def test_resetting_a_parent_cancels_its_tasks_and_cancel_task_cancels_a_subtree(stack_factory):
    stack = await stack_factory(config(providers={"echo": {"type": "echo", "echo_delay_ms": 150}})).start()
    slow = "w " * 60
    async with stack.client() as client:
        parent = await start_parent(client, "reset:parent")
        a = await spawn(client, parent, slow, description="A")
        b = await spawn(client, a.session_id, slow, description="B")
        cancelled = (
            await client.unary("CancelTask", CancelTaskRequest(task_id=a.id, reason="changed my mind"))
        ).task
        assert cancelled.status == TASK_STATUS_CANCELLED and cancelled.error.reason == "TASK_CANCELLED"
        assert "changed my mind" in cancelled.error.message
        b = await get_task(client, b.id)
        assert b.status == TASK_STATUS_CANCELLED and b.error.reason == "PARENT_TASK_ENDED"
        assert b.error.message == f"cancelled because its parent task {a.id} ended (cancelled)"
        again = (await client.unary("CancelTask", CancelTaskRequest(task_id=a.id))).task
        assert again == cancelled  # cancelling an ended task changes nothing

        async def told() -> list[common_pb2.Message]:
            return notifications(await transcript(client, parent))

        notes = await eventually(told)
        # The parent hears of A (cancelled by the client), not of B (cancelled with A).
        assert len(notes) == 1 and notes[0].metadata["task_ids"] == a.id
        assert f'Task {a.id} "A": CANCELLED' in notes[0].content and "changed my mind" in notes[0].content
        assert "All background tasks are complete (1 task; 0 failed, 1 cancelled)." in notes[0].content

        c = await spawn(client, parent, slow, description="C")
        reset = await client.unary("ResetSession", ResetSessionRequest(session_id=parent))
        c = await get_task(client, c.id)
        assert c.status == TASK_STATUS_CANCELLED and c.error.reason == "PARENT_SESSION_RESET"
        with pytest.raises(FailedPrecondition) as ended:
            await spawn(client, parent, "too late")
        assert ended.value.reason == "PARENT_SESSION_ENDED"
        listed = await client.unary("ListTasks", ListTasksRequest(parent_session_id=parent))
        assert [t.id for t in listed.tasks] == [a.id, c.id]
        assert (
            await client.unary("ListTasks", ListTasksRequest(parent_session_key="reset:parent"))
        ).tasks == []
        await asyncio.sleep(1.5)  # C is not reported anywhere: its parent conversation is gone
        assert notifications(await transcript(client, reset.session.id)) == []
    rows = await db_fetch(stack, "SELECT parent_session_id, state FROM gateway.task_notifications")
    assert [(str(r["parent_session_id"]), r["state"]) for r in rows] == [(parent, "delivered")]  # A's only


async def test_tasks_under_a_parent_pruned_while_idle_are_cancelled_too(stack_factory):
    """Maintenance deletes an idle session without a session.end (its
    activation already ended); the gateway's sweep still finds out."""
    stack = await stack_factory(config(providers={"echo": {"type": "echo", "echo_delay_ms": 150}})).start()
    async with stack.client() as client:
        parent = await start_parent(client, "pruned:parent")
        task = await spawn(client, parent, "w " * 60, description="orphan-to-be")
        # What a prune of an idle session does, as far as the gateway can see.
        await db_fetch(
            stack,
            "UPDATE sessions.activations SET ended_at = now(), end_reason = 'IDLE' "
            "WHERE session_id = $1 AND ended_at IS NULL",
            uuid.UUID(parent),
        )
        await db_fetch(stack, "DELETE FROM sessions.sessions WHERE id = $1", uuid.UUID(parent))

        async def cancelled() -> Task | None:
            current = await get_task(client, task.id)
            return current if current.status == TASK_STATUS_CANCELLED else None

        ended = await eventually(cancelled, timeout_s=10)
    assert ended.error.reason == "PARENT_SESSION_DELETED"


# ---------------------------------------------------------------- timeouts


async def test_stale_and_queue_ttls_end_tasks_with_a_message_that_says_which(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.default("stall", Reply(chunks=["late"], first_token_delay_s=30))
    stack = await stack_factory(
        config(
            {"concurrency": {"models": {"echo/echo": 1}}, "queue_ttl_s": 1.0, "stale_after_s": 1.5},
            providers={
                "echo": {"type": "echo", "echo_delay_ms": 100},
                "fake": {"type": "openai", "base_url": fake_openai.url},
            },
            agents={"staller": {"model": "fake/stall"}},
        )
    ).start()
    async with stack.client() as client:
        parent = await start_parent(client, "ttl:parent")
        busy = await spawn(client, parent, "w " * 22, description="busy")  # streams for ~2.3 s
        queued = await spawn(client, parent, "never runs", description="queued")
        stuck = await spawn(client, parent, "anything", description="stuck", agent_id="staller")
        assert (busy.status, queued.status, stuck.status) == (
            TASK_STATUS_RUNNING,
            TASK_STATUS_PENDING,
            TASK_STATUS_RUNNING,
        )
        queued = await wait_ended(client, queued.id)
        stuck = await wait_ended(client, stuck.id)
        busy = await wait_ended(client, busy.id)
        stuck_run = (await client.unary("GetRun", GetRunRequest(run_id=stuck.run_id))).run

        async def told() -> list[common_pb2.Message]:
            return notifications(await transcript(client, parent))

        notes = await eventually(told)

    assert busy.status == TASK_STATUS_COMPLETED  # it streamed all along: never stale
    assert queued.status == TASK_STATUS_ERROR and queued.error.reason == "TASK_QUEUE_TTL_EXPIRED"
    assert queued.error.message == (
        "the task waited 1 s for a free 'model:echo/echo' slot without starting (tasks.queue_ttl_s); "
        "it never ran"
    )
    assert 0.9 < seconds(queued.end_time) - seconds(queued.create_time) < 3.0
    assert queued.run_id == "" and queued.attempt == 0
    assert stuck.status == TASK_STATUS_ERROR and stuck.error.reason == "TASK_STALE"
    assert stuck.error.message == (
        "the task was running but made no progress for 1.5 s (tasks.stale_after_s); its run was cancelled"
    )
    assert 1.4 < seconds(stuck.end_time) - seconds(stuck.start_time) < 4.0
    assert stuck_run.status == RUN_STATUS_CANCELLED  # the stalled model call was abandoned
    text = "\n".join(n.content for n in notes)
    assert f'Task {queued.id} "queued": ERROR' in text and "tasks.queue_ttl_s" in text
    assert f'Task {stuck.id} "stuck": ERROR' in text and "tasks.stale_after_s" in text
    assert "All background tasks are complete (3 tasks; 2 failed)." in text


# ---------------------------------------------------------------- restarts


async def test_a_gateway_restart_keeps_tasks_queue_order_and_pending_notifications(stack_factory):
    stack = await stack_factory(
        config(
            {"concurrency": {"models": {"echo/echo": 1}}, "notify_batch_window_ms": 0},
            providers={"echo": {"type": "echo", "echo_delay_ms": 60}},
        )
    ).start()
    async with stack.client() as client:
        parent = await start_parent(client, "restart:parent")
        tasks = [
            await spawn(client, parent, f"job {i} " + "w " * 8, description=f"job {i}") for i in range(4)
        ]
        first = await wait_ended(client, tasks[0].id)
        assert first.status == TASK_STATUS_COMPLETED

    async def pending_notification() -> list[asyncpg.Record]:
        return await db_fetch(stack, "SELECT state, all_complete FROM gateway.task_notifications")

    # The first task's notification waits for the parent's next run (siblings remain).
    assert [tuple(r) for r in await eventually(pending_notification)] == [("pending", False)]
    await stack.stop("gateway", signal.SIGKILL)
    await asyncio.sleep(0.5)
    await stack.start_service("gateway")
    async with stack.client() as client:
        done = [await wait_ended(client, t.id, 30) for t in tasks]

        async def delivered() -> list[common_pb2.Message] | None:
            runs = await runs_of(client, parent)
            if len(runs) == 2 and runs[-1].status == RUN_STATUS_COMPLETED:
                return await transcript(client, parent)
            return None

        messages = await eventually(delivered, 30)
        await asyncio.sleep(1.5)
        assert await transcript(client, parent) == messages

    assert [t.status for t in done] == [TASK_STATUS_COMPLETED] * 4
    starts = [seconds(t.start_time) for t in done]
    assert starts == sorted(starts)  # queue order survived the restart
    assert max_overlap([(seconds(t.start_time), seconds(t.end_time)) for t in done]) == 1
    notes = notifications(messages)
    reported = [i for n in notes for i in n.metadata["task_ids"].split(",")]
    assert sorted(reported) == sorted(t.id for t in tasks)  # every task exactly once
    assert sum("All background tasks are complete (4 tasks; 0 failed)." in n.content for n in notes) == 1


# ---------------------------------------------------------------- agent tools


async def test_an_agent_spawns_a_task_with_a_tool_and_receives_its_result_in_a_later_turn(stack_factory):
    stack = await stack_factory(
        config(agents={"default": {"model": "echo/echo", "tools": ["spawn_task", "task_output"]}})
    ).start()
    call = '/tool spawn_task {"prompt": "research the moon", "description": "moon research"}'
    async with stack.client() as client:
        events = await collect(client.send("agent:1", call))
        session = events[0].session_id
        kinds = [e.WhichOneof("event") for e in events]
        assert "tool_call" in kinds and "tool_result" in kinds and kinds[-1] == "completed"
        tool_call = next(e.tool_call.call for e in events if e.HasField("tool_call"))
        assert tool_call.name == "spawn_task"
        result = next(e.tool_result for e in events if e.HasField("tool_result"))
        assert result.tool_call_id == tool_call.id and not result.is_error
        spawned = json.loads(result.content)
        assert spawned["description"] == "moon research" and spawned["status"] in ("PENDING", "RUNNING")
        task_id = spawned["task_id"]
        assert events[-1].completed.message.content.startswith("echo: tool result: {")

        task = await wait_ended(client, task_id)
        assert task.status == TASK_STATUS_COMPLETED and task.result == "echo: research the moon"
        assert task.parent_session_id == session and task.agent_id == "default"

        async def later_turn() -> list[common_pb2.Message] | None:
            messages = await transcript(client, session)
            return messages if len(messages) >= 6 else None

        messages = await eventually(later_turn)
        # The agent reads the task from its next turn with the other tool.
        output = await collect(client.send("agent:1", f'/tool task_output {{"task_id": "{task_id}"}}'))
        listed = await client.unary("ListTasks", ListTasksRequest(parent_session_id=session))
        children = await client.unary("ListSessions", ListSessionsRequest(parent_session_id=session))

    assert [m.role for m in messages] == [
        ROLE_USER,
        ROLE_ASSISTANT,
        ROLE_TOOL,
        ROLE_ASSISTANT,
        ROLE_SYSTEM,
        ROLE_ASSISTANT,
    ]
    assert messages[1].tool_calls[0].id == messages[2].tool_call_id == tool_call.id
    assert "Result: echo: research the moon" in messages[4].content
    # The later turn (a run of its own) answers with the task's result.
    assert messages[5].run_id != messages[3].run_id
    assert "Result: echo: research the moon" in messages[5].content
    read = json.loads(next(e.tool_result.content for e in output if e.HasField("tool_result")))
    assert (read["task_id"], read["status"], read["result"]) == (
        task_id,
        "COMPLETED",
        "echo: research the moon",
    )
    assert [t.id for t in listed.tasks] == [task_id]
    assert [s.id for s in children.sessions] == [task.session_id]


async def test_a_task_waits_for_its_own_subtask_and_continues_with_its_result(stack_factory):
    stack = await stack_factory(
        config(agents={"default": {"model": "echo/echo", "tools": ["spawn_task", "task_output"]}})
    ).start()
    leaf = json.dumps({"prompt": "leaf work", "description": "leaf"})
    middle = json.dumps({"prompt": f"/tool spawn_task {leaf}", "description": "middle"})
    async with stack.client() as client:
        events = await collect(client.send("nested:1", f"/tool spawn_task {middle}"))
        parent = events[0].session_id
        a_id = json.loads(next(e.tool_result.content for e in events if e.HasField("tool_result")))["task_id"]
        a = await wait_ended(client, a_id)
        (b,) = (await client.unary("ListTasks", ListTasksRequest(parent_session_id=a.session_id))).tasks
        inner = await transcript(client, a.session_id)

        async def told() -> list[common_pb2.Message]:
            return notifications(await transcript(client, parent))

        notes = await eventually(told)

    assert (b.status, b.parent_task_id, b.depth, b.result) == (
        TASK_STATUS_COMPLETED,
        a.id,
        2,
        "echo: leaf work",
    )
    # A's own run ended while B ran; A waited without its slot, then went on
    # with B's notification in a follow-up run (its second attempt).
    assert a.status == TASK_STATUS_COMPLETED and a.attempt == 2
    assert seconds(a.end_time) >= seconds(b.end_time)
    assert [m.role for m in inner] == [
        ROLE_USER,
        ROLE_ASSISTANT,
        ROLE_TOOL,
        ROLE_ASSISTANT,
        ROLE_SYSTEM,
        ROLE_ASSISTANT,
    ]
    assert "Result: echo: leaf work" in inner[4].content and inner[4].metadata["task_ids"] == b.id
    assert a.result == inner[5].content and "Result: echo: leaf work" in a.result
    # The user's session hears of A only (B was A's business), with A's final answer.
    assert len(notes) == 1 and notes[0].metadata["task_ids"] == a.id
    assert "Result: echo: Background task update: 1 task finished." in notes[0].content


async def test_max_tool_calls_breaks_a_tool_loop(stack_factory, fake_openai: FakeOpenAI):
    looping = Reply(
        chunks=[],
        tool_calls=[
            {
                "id": "call-1",
                "type": "function",
                "function": {
                    "name": "task_output",
                    "arguments": '{"task_id": "00000000-0000-0000-0000-000000000000"}',
                },
            }
        ],
    )
    fake_openai.default("looper", looping)
    stack = await stack_factory(
        config(
            {"max_tool_calls": 3},
            providers={"fake": {"type": "openai", "base_url": fake_openai.url}},
            agents={"looper": {"model": "fake/looper", "tools": ["task_output"]}},
        )
    ).start()
    async with stack.client() as client:
        events = await collect(client.send("loop:1", "go", agent_id="looper"))
        parent = events[0].session_id
        task = await spawn(client, parent, "loop", agent_id="looper", max_tool_calls=1)
        task = await wait_ended(client, task.id)

    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert len(results) == 3 and all(r.is_error and "TASK_NOT_FOUND" in r.content for r in results)
    assert events[-1].failed.error.reason == "TOOL_CALL_LIMIT_EXCEEDED"
    requests = fake_openai.requests_for("looper")
    assert ["tools" in r for r in requests[:4]] == [True, True, True, False]  # withdrawn after 3 calls
    assert task.status == TASK_STATUS_ERROR and task.error.reason == "TOOL_CALL_LIMIT_EXCEEDED"
    assert task.attempt == 1  # not retryable: no second attempt


async def test_tool_calls_nobody_offered_are_dropped_and_the_session_stays_usable(
    stack_factory, fake_openai: FakeOpenAI
):
    # A model that invents a tool call in a run without tools: the answer's text is kept,
    # the call is neither streamed nor stored (a stored call without a result would make
    # the provider refuse every later turn of the session).
    fake_openai.script(
        "inventive",
        Reply(
            chunks=["Let me look that up."],
            tool_calls=[
                {
                    "id": "call-x",
                    "type": "function",
                    "function": {"name": "web_search", "arguments": "{}"},
                }
            ],
        ),
    )
    fake_openai.default("inventive", Reply(chunks=["Second answer."]))
    stack = await stack_factory(
        config(
            providers={"fake": {"type": "openai", "base_url": fake_openai.url}},
            agents={"plain": {"model": "fake/inventive"}},
        )
    ).start()
    async with stack.client() as client:
        first = await collect(client.send("stray", "find it", agent_id="plain"))
        second = await collect(client.send("stray", "and now?", agent_id="plain"))
        history = await transcript(client, first[0].session_id)

    assert not any(e.HasField("tool_call") for e in first)
    assert first[-1].completed.message.content == "Let me look that up."
    assert not first[-1].completed.message.tool_calls
    assert second[-1].completed.message.content == "Second answer."
    assert [(m.role, m.content) for m in history] == [
        (ROLE_USER, "find it"),
        (ROLE_ASSISTANT, "Let me look that up."),
        (ROLE_USER, "and now?"),
        (ROLE_ASSISTANT, "Second answer."),
    ]
    assert not any(m.tool_calls for m in history)
    follow_up = fake_openai.requests_for("inventive")[-1]
    assert "tools" not in follow_up
    assert not any(m.get("tool_calls") for m in follow_up["messages"])


# ---------------------------------------------------------------- fallback


async def test_a_retried_task_avoids_the_model_that_failed_and_is_cooling(
    stack_factory, fake_openai: FakeOpenAI
):
    fake_openai.default(
        "a",
        Reply(
            status=404,
            body='{"error": {"message": "The model `a` does not exist", "code": "model_not_found"}}',
        ),
    )
    fake_openai.script("b", Reply(status=500, body='{"error": {"message": "upstream broke"}}'))
    fake_openai.default("b", Reply(chunks=["fine ", "now"]))
    stack = await stack_factory(
        config(
            providers={
                "fa": {"type": "openai", "base_url": fake_openai.url},
                "fb": {"type": "openai", "base_url": fake_openai.url},
            },
            agents={"default": {"model": "fa/a", "fallbacks": ["fb/b"]}, "parent": {"model": "echo/echo"}},
            # b's failure cools its profile for a millisecond only; a's model stays cooling.
            router={"max_retries": 0, "transient_cooldown_initial_ms": 1, "transient_cooldown_max_ms": 1},
        )
    ).start()
    async with stack.client() as client:
        parent = await quiet_parent(stack, "quiet:parent", "parent")
        task = await spawn(client, parent, "do it", description="flaky", agent_id="default")
        task = await wait_ended(client, task.id)
    events = await watch(stack, ("task.started",))

    assert task.status == TASK_STATUS_COMPLETED and task.result == "fine now"
    assert task.attempt == 2 and list(task.exclude_models) == ["fa/a"]
    assert len(fake_openai.requests_for("a")) == 1  # never tried again while cooling
    assert len(fake_openai.requests_for("b")) == 2
    assert [(n.attempt, n.message.split(":")[0]) for n in task.notices] == [
        (1, "fa/a -> fb/b (MODEL_NOT_FOUND)"),
        (1, "attempt 1 failed"),
    ]
    assert [e.task.task.attempt for e in events if e.task_id == task.id] == [1, 2]


# ---------------------------------------------------------------- API errors


async def test_spawn_task_rejects_bad_requests_with_precise_errors(stack_factory):
    stack = await stack_factory(
        config(
            {"max_depth": 1, "max_active_per_parent": 2},
            providers={"echo": {"type": "echo", "echo_delay_ms": 100}},
        )
    ).start()
    async with stack.client() as client:
        parent = await start_parent(client, "errors:parent")
        with pytest.raises(InvalidArgument) as empty:
            await spawn(client, parent, "  ")
        with pytest.raises(InvalidArgument) as model:
            await spawn(client, parent, "x", model="nowhere/x")
        with pytest.raises(NotFound) as agent:
            await spawn(client, parent, "x", agent_id="ghost")
        with pytest.raises(NotFound) as missing:
            await spawn(client, "00000000-0000-0000-0000-000000000000", "x")
        with pytest.raises(InvalidArgument) as bad_id:
            await client.unary("GetTask", GetTaskRequest(task_id="nope"))
        with pytest.raises(NotFound) as unknown:
            await client.unary("GetTask", GetTaskRequest(task_id="00000000-0000-0000-0000-000000000000"))
        first = await spawn(client, parent, "a " * 200, idempotency_key="k1")
        repeat = await spawn(client, parent, "a " * 200, idempotency_key="k1")
        with pytest.raises(InvalidArgument) as reused:
            await spawn(client, parent, "different", idempotency_key="k1")
        with pytest.raises(ResourceExhausted) as deep:
            await spawn(client, first.session_id, "subtask")
        await spawn(client, parent, "a " * 200)
        with pytest.raises(ResourceExhausted) as crowded:
            await spawn(client, parent, "one too many")
        # A task whose run is cancelled from outside (not through CancelTask) is INTERRUPTED.
        await client.unary("CancelRun", CancelRunRequest(run_id=first.run_id, reason="operator"))
        interrupted = await wait_ended(client, first.id)

    assert (empty.value.reason, empty.value.field) == ("EMPTY_PROMPT", "prompt")
    assert (model.value.reason, model.value.field) == ("UNKNOWN_MODEL", "model")
    assert (agent.value.reason, agent.value.field) == ("AGENT_NOT_FOUND", "agent_id")
    assert missing.value.reason == "SESSION_NOT_FOUND"
    assert (bad_id.value.reason, bad_id.value.field) == ("INVALID_ID", "task_id")
    assert (unknown.value.reason, unknown.value.field) == ("TASK_NOT_FOUND", "task_id")
    assert repeat.id == first.id
    assert reused.value.reason == "IDEMPOTENCY_KEY_REUSED"
    assert deep.value.reason == "TASK_DEPTH_EXCEEDED"
    assert crowded.value.reason == "TOO_MANY_TASKS"
    assert interrupted.status == common_pb2.TASK_STATUS_INTERRUPTED
    assert (interrupted.error.reason, interrupted.attempt) == ("RUN_INTERRUPTED", 1)
    assert "operator" in interrupted.error.message


# ---------------------------------------------------------------- isolation


def run_token(
    org_id: str, session_id: str, run_id: str, epoch: int = 1, secret: str = RUN_TOKEN_SECRET
) -> str:
    """A run token signed like the gateway signs (Ed25519); ``secret`` another key forges one."""
    now_s = int(time.time())
    claims = {
        "iss": "runyard.gateway",
        "aud": "runyard.internal",
        "sub": run_id,
        "iat": now_s,
        "exp": now_s + 600,
        "org": org_id,
        "agt": "default",
        "ses": session_id,
        "epo": epoch,
    }
    if secret == RUN_TOKEN_SECRET:
        return jwt.encode(claims, load_private_key(secret), algorithm="EdDSA")
    return jwt.encode(claims, secret, algorithm="HS256")


async def test_tasks_are_scoped_by_org_and_the_task_service_by_run_token(stack_factory, migrated_url):
    pool = await asyncpg.create_pool(migrated_url, min_size=1, max_size=2)
    try:
        store = ApiKeyStore(pool)
        everything = ["chat", "sessions:read", "sessions:admin"]
        keys = {
            name: (await store.create(org, name, scopes))[1]
            for name, org, scopes in (
                ("a", "org-a", everything),
                ("b", "org-b", everything),
                ("ro", "org-a", ["sessions:read"]),
            )
        }
    finally:
        await pool.close()
    stack = await stack_factory(
        config(auth={"anonymous": False}, providers={"echo": {"type": "echo", "echo_delay_ms": 100}})
    ).start()
    async with stack.client(keys["a"]) as a, stack.client(keys["b"]) as b, stack.client(keys["ro"]) as ro:
        first = await collect(a.send("iso:parent", "hi"))
        parent, finished_run = first[0].session_id, first[0].run_id
        task = await spawn(a, parent, "mine", description="mine")
        for call in (
            b.unary("GetTask", GetTaskRequest(task_id=task.id)),
            b.unary("CancelTask", CancelTaskRequest(task_id=task.id)),
        ):
            with pytest.raises(NotFound) as hidden:
                await call
            assert hidden.value.reason == "TASK_NOT_FOUND"
        with pytest.raises(NotFound) as foreign_parent:
            await spawn(b, parent, "theirs")
        assert foreign_parent.value.reason == "SESSION_NOT_FOUND"
        assert (await b.unary("ListTasks", ListTasksRequest(parent_session_id=parent))).tasks == []
        with pytest.raises(PermissionDenied) as scope:
            await spawn(ro, parent, "read-only key")
        assert scope.value.reason == "SCOPE_REQUIRED"
        assert (await ro.unary("GetTask", GetTaskRequest(task_id=task.id))).task.id == task.id

        # A run in progress on another session of org-a (its tool calls' view).
        stream = a.send("iso:other", "w " * 40)
        events = [await anext(stream) for _ in range(2)]
        other, other_run = events[0].session_id, events[0].run_id
        assert events[1].HasField("started")
        async with grpc.aio.insecure_channel(stack.gateway_internal_address) as channel:
            service = tasks_pb2_grpc.TaskServiceStub(channel)
            internal = (("x-runyard-internal", INTERNAL_SECRET),)
            live = run_token("org-a", other, other_run)
            cases = [
                ((), live, "INTERNAL_AUTH_REQUIRED"),
                (
                    internal,
                    run_token("org-a", other, other_run, secret="forged-forged-forged-forged-forged!"),
                    "RUN_TOKEN_INVALID",
                ),
                (internal, run_token("org-a", parent, finished_run), "RUN_NOT_ACTIVE"),  # the run has ended
                (internal, run_token("org-a", other, other_run, epoch=9), "RUN_NOT_ACTIVE"),  # not its epoch
                (internal, live, "TASK_NOT_FOUND"),  # a task of another session
            ]
            for metadata, token, reason in cases:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await service.GetTask(
                        tasks_pb2.TaskServiceGetTaskRequest(run_token=token, task_id=task.id),
                        metadata=metadata,
                    )
                assert from_rpc_error(refused.value).reason == reason
            spawned = await service.SpawnTask(
                tasks_pb2.TaskServiceSpawnTaskRequest(
                    run_token=live, prompt="from the run", idempotency_key="t1"
                ),
                metadata=internal,
            )
            repeat = await service.SpawnTask(
                tasks_pb2.TaskServiceSpawnTaskRequest(
                    run_token=live, prompt="worded otherwise", idempotency_key="t1"
                ),
                metadata=internal,
            )
            read = await service.GetTask(
                tasks_pb2.TaskServiceGetTaskRequest(run_token=live, task_id=spawned.task.id),
                metadata=internal,
            )
        await stream.aclose()
    assert spawned.task.parent_session_id == other and spawned.task.agent_id == "default"
    assert repeat.task.id == spawned.task.id == read.task.id
