"""Background tasks' slot queue on real PostgreSQL (issue 6), with two task
managers standing in for two gateway replicas: grants, notices, session
ends, results, a waiter whose run cannot be queued. (Moved from
tests/unit/test_tasks.py.)"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.config import load_config
from runyard.gateway.runs import RunStore, encode_batch, event_bytes
from runyard.gateway.tasks import TaskManager
from runyard.gateway.watch import OUTBOX

pytestmark = pytest.mark.timeout(60)


def tasks_config(**tasks: Any):
    return load_config(
        environ={
            f"RUNYARD_TASKS__{k.upper()}": json.dumps(v) if isinstance(v, dict) else str(v)
            for k, v in tasks.items()
        }
    )


# ---------------------------------------------------------------- the slot queue on PostgreSQL


class _Dispatcher:
    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1

    def cancel_local(self, run_id: uuid.UUID, reason: str = "") -> bool:
        return False


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
            INSERT INTO gateway.tasks (id, org_id, parent_session_id, parent_session_key,
                parent_agent_id, depth, session_id, session_key, agent_id, description, prompt,
                concurrency_key, status, progress_at)
            VALUES ($1, 'org', $2, 'parent', 'default', 1, $3, $4, 'default', $5, 'p', $6, 'pending', now())
            """,
            task_id,
            parent,
            uuid.uuid4(),
            f"task:{task_id}",
            f"task {index}",
            key,
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
    events = await pool.fetch(
        "SELECT type, count(*) AS n FROM gateway.outbox WHERE type LIKE 'task.%' GROUP BY type"
    )
    assert {r["type"]: r["n"] for r in events} == {"task.started": 10, "task.completed": 10}


async def test_repeated_notices_of_an_attempt_are_kept_once(pool):
    manager = _manager(pool, tasks_config(), "gw")
    [task_id] = await _insert_tasks(pool, 1, "default")
    async with pool.acquire() as conn:
        first = await manager._record_notices(
            conn,
            task_id,
            1,
            [
                "fa/a -> fb/b (RATE_LIMIT): retry after 2 s",
                "fa/a -> fb/b (RATE_LIMIT): retry after 3 s",
            ],
        )
        again = await manager._record_notices(
            conn, task_id, 1, ["FA/A -> FB/B (RATE_LIMIT):  retry after 9 s"]
        )
        next_attempt = await manager._record_notices(
            conn, task_id, 2, ["fa/a -> fb/b (RATE_LIMIT): retry after 2 s"]
        )
    assert (first, again, next_attempt) == (1, 0, 1)
    task = await manager.get("org", task_id)
    assert [(n.attempt, n.message) for n in task.notices] == [
        (1, "fa/a -> fb/b (RATE_LIMIT): retry after 2 s"),
        (2, "fa/a -> fb/b (RATE_LIMIT): retry after 2 s"),
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
        uuid.uuid4(),
        deleted,
        uuid.uuid4(),
        compacted,
    )

    def end(
        session_id: uuid.UUID, reason: int, next_id: uuid.UUID | None = None
    ) -> common_pb2.LifecycleEvent:
        return common_pb2.LifecycleEvent(
            type="session.end",
            org_id="org",
            session_id=str(session_id),
            session_end=common_pb2.SessionEndData(reason=reason, next_session_id=str(next_id or "")),
        )

    async with pool.acquire() as conn:
        await OUTBOX.emit(
            conn,
            [
                end(compacted, common_pb2.SESSION_END_REASON_COMPACTION, successor),
                end(uuid.uuid4(), common_pb2.SESSION_END_REASON_IDLE),
                end(deleted, common_pb2.SESSION_END_REASON_DELETED),
            ],
        )
    assert await OUTBOX.wait_final(pool)  # no other writer on the server holds them back
    assert await manager.consume_session_ends() == 3
    assert await manager.consume_session_ends() == 0  # the cursor moved past them

    rows = {
        r["id"]: r for r in await pool.fetch("SELECT id, status, error, parent_session_id FROM gateway.tasks")
    }
    for task_id in doomed:
        assert rows[task_id]["status"] == "cancelled"
        assert common_pb2.RunError.FromString(rows[task_id]["error"]).reason == "PARENT_SESSION_DELETED"
    # The compacted conversation's task follows it to the new session id (and,
    # its key being re-granted after the cascade, it got a slot).
    assert (rows[moved[0]]["status"], rows[moved[0]]["parent_session_id"]) == ("running", successor)
    notes = await pool.fetch("SELECT parent_session_id, state FROM gateway.task_notifications ORDER BY state")
    assert [(r["parent_session_id"], r["state"]) for r in notes] == [
        (deleted, "dropped"),
        (successor, "pending"),
    ]


async def test_news_of_a_reset_or_deleted_parent_is_dropped_even_before_it_was_batched(pool):
    """Notifications follow the session key: news that outlived its
    conversation must not reach the key's next one."""
    manager = _manager(pool, tasks_config(notify_batch_window_ms=0), "gw")
    parent = uuid.uuid4()
    [ended, running] = await _insert_tasks(pool, 2, "default", parent=parent)
    await pool.execute(
        "UPDATE gateway.tasks SET status = 'completed', ended_at = now(), notify_state = 'pending' "
        "WHERE id = $1",
        ended,
    )
    assert await manager.session_ended("org", [str(parent)], "RESET") == 1
    await manager.batch_notifications()
    assert await pool.fetch("SELECT state FROM gateway.task_notifications") == []
    rows = {
        r["id"]: tuple(r)[1:] for r in await pool.fetch("SELECT id, status, notify_state FROM gateway.tasks")
    }
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
        run_id,
        encode_batch([delta] * 100),
        last - 1,
    )
    done = event_bytes(completed=common_pb2.RunCompleted(message=common_pb2.Message(content="the answer")))
    await pool.execute(
        "INSERT INTO gateway.run_events (run_id, seq, last_seq, data) VALUES ($1, $2, $2, $3)",
        run_id,
        last,
        encode_batch([done]),
    )
    await pool.execute(
        "UPDATE gateway.runs SET status = 'completed', ended_at = now(), last_seq = $2 WHERE id = $1",
        run_id,
        last,
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
        common_pb2.RunPayload(
            run_id=str(uuid.uuid4()),
            org_id="org",
            session_id=str(session_id),
            session_key=f"task:{blocked}",
            agent_id="default",
        ),
        fingerprint=b"",
        strategy="ENQUEUE",
    )
    run_id = await pool.fetchval("SELECT run_id FROM gateway.tasks WHERE id = $1", first)
    await pool.execute("UPDATE gateway.runs SET status = 'completed', ended_at = now() WHERE id = $1", run_id)
    assert await manager.reconcile() == 1
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, status, slot_held, error FROM gateway.tasks")}
    assert [(rows[i]["status"], rows[i]["slot_held"]) for i in (first, blocked, third)] == [
        ("completed", False),
        ("error", False),
        ("running", True),
    ]
    assert common_pb2.RunError.FromString(rows[blocked]["error"]).reason == "SESSION_QUEUE_FULL"
