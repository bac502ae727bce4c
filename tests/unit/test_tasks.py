"""Background tasks below the service level (issue 6): keys and limits, the
[tasks] config, notices, notification text, the echo provider's scripted tool
calls, the tools' argument checks, and the slot queue on real PostgreSQL with
two task managers standing in for two gateway replicas."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import ConfigError, ProviderConfig, load_config
from runyard.gateway.runs import RunStore, encode_batch, event_bytes
from runyard.gateway.tasks import TaskManager, concurrency_key, normalise_notice, notification_message, slot_limit
from runyard.gateway.watch import OUTBOX
from runyard.router.providers import EchoProvider, Request, anthropic_messages
from runyard.worker.tools import BUILTIN_TOOLS, TaskTools, offered_tools

pytestmark = pytest.mark.timeout(60)


def tasks_config(**tasks: Any):
    return load_config(environ={f"RUNYARD_TASKS__{k.upper()}": json.dumps(v) if isinstance(v, dict) else str(v)
                                for k, v in tasks.items()})


# ---------------------------------------------------------------- keys, limits, config


def test_the_key_is_the_model_else_the_provider_else_default(tmp_path: Path):
    path = tmp_path / "runyard.toml"
    path.write_text(
        """
[providers.local]
type = "openai"
base_url = "http://127.0.0.1:1/v1"

[tasks.concurrency]
default = 3
models = { "local/big" = 1, "echo/echo" = 0 }
providers = { local = 4 }
"""
    )
    config = load_config(path, environ={})
    assert concurrency_key(config, "local/big") == "model:local/big"
    assert concurrency_key(config, "local/small") == "provider:local"
    assert concurrency_key(config, "echo/echo") == "model:echo/echo"
    assert concurrency_key(config, "echo/other") == "default"
    assert [slot_limit(config, k) for k in ("model:local/big", "provider:local", "model:echo/echo", "default")] == [
        1, 4, 0, 3
    ]
    defaults = load_config(environ={})
    assert defaults.tasks.concurrency.default == 5 and defaults.tasks.stale_after_s == 1800


def test_tasks_config_errors_name_their_path(tmp_path: Path):
    path = tmp_path / "runyard.toml"
    path.write_text(
        """
[tasks]
stale_after_s = 0
[tasks.concurrency]
default = -1
models = { "no-slash" = 1 }
providers = { ghost = 2 }
[agents.default]
model = "echo/echo"
tools = ["spawn_task", "rm_rf"]
"""
    )
    with pytest.raises(ConfigError) as bad:
        load_config(path, environ={})
    paths = {p for p, _ in bad.value.problems}
    assert {"tasks.stale_after_s", "tasks.concurrency.default", "tasks.concurrency.models",
            "agents.default.tools.1"} <= paths
    path.write_text('[tasks.concurrency]\nproviders = { ghost = 2 }\nmodels = { "nowhere/x" = 1 }\n')
    with pytest.raises(ConfigError) as dangling:
        load_config(path, environ={})
    assert dict(dangling.value.problems) == {
        "tasks.concurrency.providers.ghost": "provider 'ghost' is not configured (known: echo)",
        "tasks.concurrency.models.nowhere/x": "model 'nowhere/x' names a provider that is not configured (known: echo)",
    }


# ---------------------------------------------------------------- notices and messages


def test_notices_that_differ_only_in_numbers_ids_case_or_spacing_normalise_alike():
    a = "fa/a -> fb/b (RATE_LIMIT): Rate limited, retry after 2.5 s (request 1f0e4c1a-0b8e-4a49-9d1a-3c2b1a0f9e8d)"
    b = "fa/a -> fb/b (RATE_LIMIT):  rate limited, retry after 30 s (request 7a1c2b3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d)"
    assert normalise_notice(a) == normalise_notice(b)
    assert normalise_notice(a) != normalise_notice("fa/a -> fb/b (OVERLOADED): overloaded")


def _row(status: str, *, result: str = "", error: str = "", seconds: float = 1.5) -> dict[str, Any]:
    created = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return {
        "id": uuid.UUID(int=len(status) + int(seconds * 10)),
        "description": f"{status} job",
        "status": status,
        "result": result,
        "error": common_pb2.RunError(message=error).SerializeToString() if error else None,
        "created_at": created,
        "ended_at": created + dt.timedelta(seconds=seconds),
    }


def test_a_notification_names_each_task_and_says_when_all_are_complete():
    rows = [_row("completed", result="x" * 50), _row("error", error="the model refused", seconds=95)]
    note_id = uuid.uuid4()
    partial = notification_message(rows, notification_id=note_id, result_chars=20, totals=None)
    final = notification_message(rows, notification_id=note_id, result_chars=20, totals=(3, 1, 1))
    assert partial.role == common_pb2.ROLE_SYSTEM and partial.id == str(note_id)
    assert partial.content.splitlines() == [
        "Background task update: 2 tasks finished.",
        f'- Task {rows[0]["id"]} "completed job": COMPLETED after 1.5 s. Result: {"x" * 19}…',
        f'- Task {rows[1]["id"]} "error job": ERROR after 1.6 min. Error: the model refused',
    ]
    assert partial.metadata["all_complete"] == "false"
    assert partial.metadata["task_ids"] == f"{rows[0]['id']},{rows[1]['id']}"
    assert final.content.splitlines()[-1] == "All background tasks are complete (3 tasks; 1 failed, 1 cancelled)."
    assert final.metadata["all_complete"] == "true"


# ---------------------------------------------------------------- echo's scripted tool calls


async def _echo(messages: list[common_pb2.Message], tools: bool = True) -> list[Any]:
    provider = EchoProvider("echo", ProviderConfig(type="echo"))
    request = Request(model="echo", messages=messages, tools=list(BUILTIN_TOOLS.values()) if tools else [])
    return [chunk async for chunk in provider.stream(request, "")]


async def test_echo_calls_a_tool_when_asked_and_answers_tool_results_and_notifications():
    user = common_pb2.Message(role=common_pb2.ROLE_USER, content='/tool spawn_task {"prompt": "p"}')
    chunks = await _echo([user])
    assert [c.kind for c in chunks] == ["tool_call", "usage", "finish"]
    assert (chunks[0].tool_call.id, chunks[0].tool_call.name, chunks[0].tool_call.arguments_json) == (
        "echo-call-1", "spawn_task", '{"prompt": "p"}'
    )
    assert chunks[-1].finish_reason == "tool_calls"
    # Without tools offered it is an ordinary message.
    assert "".join(c.text for c in await _echo([user], tools=False)) == 'echo: /tool spawn_task {"prompt": "p"}'
    result = common_pb2.Message(role=common_pb2.ROLE_TOOL, content='{"task_id": "t"}', tool_call_id="echo-call-1")
    assert "".join(c.text for c in await _echo([user, result])) == 'echo: tool result: {"task_id": "t"}'
    note = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Background task update: done")
    system = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief.")
    assert "".join(c.text for c in await _echo([system, user, note])) == "echo: Background task update: done"
    assert "".join(c.text for c in await _echo([system])) == "echo: "


def test_anthropic_keeps_a_notification_in_place_as_a_user_turn():
    system, messages = anthropic_messages([
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
        common_pb2.Message(role=common_pb2.ROLE_USER, content="hi"),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="hello"),
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, content="Background task update: 1 task finished."),
    ])
    assert system == "Be brief."
    assert messages[-1] == {"role": "user", "content": [
        {"type": "text", "text": "Background task update: 1 task finished."}
    ]}


# ---------------------------------------------------------------- the tools


class _NoGateway:
    """A TaskService stub that must not be called."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"{name} called for a request the tool should have refused")


async def test_tools_refuse_bad_arguments_without_calling_the_gateway():
    async def retrying(call):
        return await call()

    tools = TaskTools(_NoGateway(), (), wait_max_s=1.0, retrying=retrying)  # type: ignore[arg-type]
    payload = common_pb2.RunPayload(run_id="r", run_token="t")

    async def run(name: str, arguments: str) -> tuple[str, bool]:
        result = await tools.execute(payload, common_pb2.ToolCall(id="c", name=name, arguments_json=arguments), 1)
        return json.loads(result.content)["error"], result.is_error

    assert await run("spawn_task", "{not json") == (
        "arguments are not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        True,
    )
    assert await run("spawn_task", "[1]") == ("arguments must be a JSON object", True)
    assert await run("spawn_task", '{"prompt": " "}') == ("'prompt' (a non-empty string) is required", True)
    assert await run("spawn_task", '{"prompt": "p", "max_tool_calls": -1}') == (
        "'max_tool_calls' must be a whole number >= 0", True
    )
    assert await run("task_output", "{}") == ("'task_id' (a string) is required", True)
    assert await run("task_output", '{"task_id": "x", "wait_s": "soon"}') == ("'wait_s' must be a number >= 0", True)
    assert await run("rm", "{}") == ("unknown tool 'rm'; available: spawn_task, task_output", True)


def test_tools_are_offered_by_agent_config_or_run_option():
    config = load_config(environ={"RUNYARD_AGENTS__DEFAULT__TOOLS": '["task_output"]',
                                  "RUNYARD_AGENTS__DEFAULT__MODEL": "echo/echo",
                                  "RUNYARD_AGENTS__PLAIN__MODEL": "echo/echo"})

    def names(payload: common_pb2.RunPayload) -> list[str]:
        return [t.name for t in offered_tools(config, payload)]

    assert names(common_pb2.RunPayload(agent_id="default")) == ["task_output"]
    assert names(common_pb2.RunPayload(agent_id="plain")) == []
    enabled = common_pb2.RunPayload(agent_id="plain", options=common_pb2.RunOptions(tools_enabled=True))
    assert names(enabled) == ["spawn_task", "task_output"]
    schema = json.loads(BUILTIN_TOOLS["spawn_task"].parameters_json_schema)
    assert schema["required"] == ["prompt"] and schema["additionalProperties"] is False


# ---------------------------------------------------------------- the slot queue on PostgreSQL


class _Dispatcher:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1

    def cancel_local(self, run_id: uuid.UUID, reason: str = "") -> bool:
        return False


@pytest.fixture
async def pool(migrated_url: str):
    pool = await asyncpg.create_pool(migrated_url, min_size=2, max_size=12)
    yield pool
    await pool.close()


def _manager(pool: asyncpg.Pool, config, name: str) -> TaskManager:
    runs = RunStore(pool, gateway_id=name, lease_s=10, max_attempts=3, max_queued_per_session=100)
    return TaskManager(config, pool, runs, _Dispatcher(), None, gateway_id=name)  # type: ignore[arg-type]


async def _insert_tasks(
    pool: asyncpg.Pool, count: int, key: str, parent: uuid.UUID | None = None
) -> list[uuid.UUID]:
    parent = parent or uuid.uuid4()
    ids = []
    for index in range(count):
        task_id = uuid.uuid4()
        await pool.execute(
            """
            INSERT INTO gateway.tasks (id, org_id, parent_session_id, parent_session_key, parent_agent_id, depth,
                session_id, session_key, agent_id, description, prompt, concurrency_key, status, progress_at)
            VALUES ($1, 'org', $2, 'parent', 'default', 1, $3, $4, 'default', $5, 'p', $6, 'pending', now())
            """,
            task_id, parent, uuid.uuid4(), f"task:{task_id}", f"task {index}", key,
        )
        ids.append(task_id)
    return ids


async def test_two_replicas_hand_out_slots_first_in_first_out_and_never_over_the_limit(pool):
    config = tasks_config(concurrency={"models": {"echo/echo": 3}})
    replicas = [_manager(pool, config, "gw-1"), _manager(pool, config, "gw-2")]
    ids = await _insert_tasks(pool, 10, "model:echo/echo")
    started: list[uuid.UUID] = []
    for _ in range(20):
        await asyncio.gather(*(r.grant_all() for r in replicas), *(r.reconcile() for r in replicas))
        holding = await pool.fetch(
            "SELECT id, run_id FROM gateway.tasks WHERE slot_held ORDER BY started_at, queue_pos"
        )
        assert len(holding) <= 3
        started += [r["id"] for r in holding if r["id"] not in started]
        if not holding:
            break
        # Every held slot's run completes; both replicas race to hand the slots on.
        await pool.execute(
            "UPDATE gateway.runs SET status = 'completed', ended_at = now() WHERE id = ANY($1::uuid[])",
            [r["run_id"] for r in holding],
        )
    assert started == ids  # spawn order
    rows = await pool.fetch("SELECT status, attempt FROM gateway.tasks")
    assert {(r["status"], r["attempt"]) for r in rows} == {("completed", 1)}
    runs = await pool.fetch("SELECT task_id, count(*) AS n FROM gateway.runs GROUP BY task_id")
    assert len(runs) == 10 and {r["n"] for r in runs} == {1}  # no task got two runs
    events = await pool.fetch("SELECT type, count(*) AS n FROM gateway.outbox WHERE type LIKE 'task.%' GROUP BY type")
    assert {r["type"]: r["n"] for r in events} == {"task.started": 10, "task.completed": 10}


async def test_repeated_notices_of_an_attempt_are_kept_once(pool):
    manager = _manager(pool, tasks_config(), "gw")
    [task_id] = await _insert_tasks(pool, 1, "default")
    async with pool.acquire() as conn:
        first = await manager._record_notices(conn, task_id, 1, [
            "fa/a -> fb/b (RATE_LIMIT): retry after 2 s", "fa/a -> fb/b (RATE_LIMIT): retry after 3 s",
        ])
        again = await manager._record_notices(conn, task_id, 1, ["FA/A -> FB/B (RATE_LIMIT):  retry after 9 s"])
        next_attempt = await manager._record_notices(conn, task_id, 2, ["fa/a -> fb/b (RATE_LIMIT): retry after 2 s"])
    assert (first, again, next_attempt) == (1, 0, 1)
    task = await manager.get("org", task_id)
    assert [(n.attempt, n.message) for n in task.notices] == [
        (1, "fa/a -> fb/b (RATE_LIMIT): retry after 2 s"), (2, "fa/a -> fb/b (RATE_LIMIT): retry after 2 s")
    ]


async def test_session_ends_from_any_path_cascade_or_follow_the_compaction(pool):
    manager = _manager(pool, tasks_config(), "gw")
    deleted, compacted, successor = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    doomed = await _insert_tasks(pool, 2, "default", parent=deleted)
    moved = await _insert_tasks(pool, 1, "default", parent=compacted)
    await pool.execute(
        "INSERT INTO gateway.task_notifications (id, org_id, parent_session_id, parent_session_key, message, "
        "all_complete, state) VALUES ($1, 'org', $2, 'parent', '', false, 'pending'), "
        "($3, 'org', $4, 'parent', '', false, 'pending')",
        uuid.uuid4(), deleted, uuid.uuid4(), compacted,
    )

    def end(session_id: uuid.UUID, reason: int, next_id: uuid.UUID | None = None) -> common_pb2.LifecycleEvent:
        return common_pb2.LifecycleEvent(
            type="session.end", org_id="org", session_id=str(session_id),
            session_end=common_pb2.SessionEndData(reason=reason, next_session_id=str(next_id or "")),
        )

    async with pool.acquire() as conn:
        await OUTBOX.emit(conn, [
            end(compacted, common_pb2.SESSION_END_REASON_COMPACTION, successor),
            end(uuid.uuid4(), common_pb2.SESSION_END_REASON_IDLE),
            end(deleted, common_pb2.SESSION_END_REASON_DELETED),
        ])
    assert await OUTBOX.wait_final(pool)  # no other writer on the server holds them back
    assert await manager.consume_session_ends() == 3
    assert await manager.consume_session_ends() == 0  # the cursor moved past them

    rows = {r["id"]: r for r in await pool.fetch("SELECT id, status, error, parent_session_id FROM gateway.tasks")}
    for task_id in doomed:
        assert rows[task_id]["status"] == "cancelled"
        assert common_pb2.RunError.FromString(rows[task_id]["error"]).reason == "PARENT_SESSION_DELETED"
    # The compacted conversation's task follows it to the new session id (and,
    # its key being re-granted after the cascade, it got a slot).
    assert (rows[moved[0]]["status"], rows[moved[0]]["parent_session_id"]) == ("running", successor)
    notes = await pool.fetch("SELECT parent_session_id, state FROM gateway.task_notifications ORDER BY state")
    assert [(r["parent_session_id"], r["state"]) for r in notes] == [(deleted, "dropped"), (successor, "pending")]


async def test_news_of_a_reset_or_deleted_parent_is_dropped_even_before_it_was_batched(pool):
    """Notifications follow the session key: news that outlived its
    conversation must not reach the key's next one."""
    manager = _manager(pool, tasks_config(notify_batch_window_ms=0), "gw")
    parent = uuid.uuid4()
    [ended, running] = await _insert_tasks(pool, 2, "default", parent=parent)
    await pool.execute(
        "UPDATE gateway.tasks SET status = 'completed', ended_at = now(), notify_state = 'pending' WHERE id = $1", ended
    )
    assert await manager.session_ended("org", [str(parent)], "RESET") == 1
    await manager.batch_notifications()
    assert await pool.fetch("SELECT state FROM gateway.task_notifications") == []
    rows = {r["id"]: tuple(r)[1:] for r in await pool.fetch("SELECT id, status, notify_state FROM gateway.tasks")}
    assert rows == {ended: ("completed", "skipped"), running: ("cancelled", "skipped")}


async def test_the_result_is_the_runs_final_answer_however_many_events_it_streamed(pool):
    manager = _manager(pool, tasks_config(), "gw")
    [task_id] = await _insert_tasks(pool, 1, "default")
    await manager.grant_all()
    run_id = await pool.fetchval("SELECT run_id FROM gateway.tasks WHERE id = $1", task_id)
    last = 25_002  # more events than the failover scan reads
    delta = event_bytes(text_delta=common_pb2.TextDelta(text="word "))
    await pool.execute(  # chunks of 100 events, as the run log stores them
        "INSERT INTO gateway.run_events (run_id, seq, last_seq, data) "
        "SELECT $1, g, least(g + 99, $3), $2 FROM generate_series(2, $3, 100) g",
        run_id, encode_batch([delta] * 100), last - 1,
    )
    done = event_bytes(completed=common_pb2.RunCompleted(message=common_pb2.Message(content="the answer")))
    await pool.execute(
        "INSERT INTO gateway.run_events (run_id, seq, last_seq, data) VALUES ($1, $2, $2, $3)",
        run_id, last, encode_batch([done]),
    )
    await pool.execute(
        "UPDATE gateway.runs SET status = 'completed', ended_at = now(), last_seq = $2 WHERE id = $1", run_id, last
    )
    assert await manager.reconcile() == 1
    row = await pool.fetchrow("SELECT status, result FROM gateway.tasks WHERE id = $1", task_id)
    assert tuple(row) == ("completed", "the answer")


async def test_a_waiter_whose_run_cannot_be_queued_ends_and_the_queue_moves_on(pool):
    manager = _manager(pool, tasks_config(concurrency={"default": 1}), "gw")
    manager.runs.max_queued_per_session = 1
    [first, blocked, third] = await _insert_tasks(pool, 3, "default")
    await manager.grant_all()
    # Someone sent a message to the second task's session: its queue is full.
    session_id = await pool.fetchval("SELECT session_id FROM gateway.tasks WHERE id = $1", blocked)
    await manager.runs.insert(
        common_pb2.RunPayload(run_id=str(uuid.uuid4()), org_id="org", session_id=str(session_id),
                              session_key=f"task:{blocked}", agent_id="default"),
        fingerprint=b"", strategy="ENQUEUE",
    )
    run_id = await pool.fetchval("SELECT run_id FROM gateway.tasks WHERE id = $1", first)
    await pool.execute("UPDATE gateway.runs SET status = 'completed', ended_at = now() WHERE id = $1", run_id)
    assert await manager.reconcile() == 1
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, status, slot_held, error FROM gateway.tasks")}
    assert [(rows[i]["status"], rows[i]["slot_held"]) for i in (first, blocked, third)] == [
        ("completed", False), ("error", False), ("running", True)
    ]
    assert common_pb2.RunError.FromString(rows[blocked]["error"]).reason == "SESSION_QUEUE_FULL"
