"""The gateway's lifecycle-event relay and run events (real PostgreSQL):
concurrent relays never copy an event twice; run status changes map to the
DESIGN.md event names."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg
import grpc
import pytest

from runyard._proto.v1 import common_pb2, gateway_pb2
from runyard.common.errors import Unimplemented
from runyard.gateway.watch import OUTBOX, EventRelay, Watcher, run_events

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def pool(pool: asyncpg.Pool) -> asyncpg.Pool:
    """The shared pool, with the relay cursors of both sources in place."""
    await pool.execute("INSERT INTO gateway.event_cursors (source) VALUES ('sessions'), ('router')")
    return pool


def source_events(count: int) -> list[common_pb2.LifecycleEvent]:
    return [
        common_pb2.LifecycleEvent(id=i, type="session.start", org_id="org", session_id=str(uuid.uuid4()))
        for i in range(1, count + 1)
    ]


async def test_concurrent_relays_copy_each_event_exactly_once(pool):
    upstream = source_events(1200)
    calls = 0

    async def fetch(after_id: int, limit: int):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)  # an RPC: every relay may fetch the same page; one commits it
        return [e for e in upstream if e.id > after_id][:limit]

    relays = [EventRelay(pool, {"sessions": fetch}) for _ in range(4)]
    for _ in range(6):
        await asyncio.gather(*(relay.relay_once("sessions") for relay in relays))
    rows = await pool.fetch("SELECT session_id FROM gateway.outbox ORDER BY pos")
    assert [str(r["session_id"]) for r in rows] == [e.session_id for e in upstream]
    assert await pool.fetchval("SELECT after_id FROM gateway.event_cursors WHERE source = 'sessions'") == 1200


async def test_a_source_without_list_events_is_skipped_and_the_others_relay(pool):
    async def unimplemented(after_id: int, limit: int):
        error = Unimplemented("no ListEvents")
        error.code = grpc.StatusCode.UNIMPLEMENTED
        raise error

    async def sessions(after_id: int, limit: int):
        return [e for e in source_events(3) if e.id > after_id]

    relay = EventRelay(pool, {"router": unimplemented, "sessions": sessions})
    await relay._round()
    await relay._round()
    assert await pool.fetchval("SELECT count(*) FROM gateway.outbox") == 3
    assert "router" in relay._skip_until


async def test_watch_is_scoped_by_org_and_resumes_after_an_id(pool):
    async with pool.acquire() as conn:
        ids = await OUTBOX.emit(
            conn,
            [
                common_pb2.LifecycleEvent(type="session.start", org_id="a"),
                common_pb2.LifecycleEvent(type="session.start", org_id="b"),
                common_pb2.LifecycleEvent(type="service.startup", org_id=""),
                common_pb2.LifecycleEvent(type="session.end", org_id="a"),
            ],
        )
    assert ids == sorted(ids) and len(set(ids)) == 4
    watcher = Watcher(pool, poll_interval_s=0.1)
    closing = asyncio.Event()

    async def read(org: str, after: int, admin: bool) -> list[tuple[int, str]]:
        seen = []
        stream = watcher.follow(
            org, gateway_pb2.WatchEventsRequest(after_id=after), closing, service_events=admin
        )
        try:
            while True:
                event = await asyncio.wait_for(anext(stream), 0.5)
                seen.append((event.id, event.type))
        except TimeoutError:
            return seen
        finally:
            await stream.aclose()

    assert await read("a", 0, False) == [(ids[0], "session.start"), (ids[3], "session.end")]
    assert await read("a", ids[0], False) == [(ids[3], "session.end")]
    assert await read("b", 0, True) == [(ids[1], "session.start"), (ids[2], "service.startup")]


def run_row(status: str, **extra):
    now = dt.datetime.now(dt.UTC)
    row = {
        "id": uuid.uuid4(),
        "org_id": "org",
        "session_id": uuid.uuid4(),
        "session_key": "k",
        "agent_id": "a",
        "status": status,
        "attempt": 1,
        "model": "fake/m",
        "error": None,
        "input_text": "hello",
        "created_at": now - dt.timedelta(seconds=3),
        "first_claimed_at": now - dt.timedelta(seconds=2),
        "started_at": now - dt.timedelta(seconds=2),
        "ended_at": now,
        "task_id": None,
    }
    row.update(extra)
    return row


def test_run_status_changes_map_to_the_design_event_names():
    completed = common_pb2.RunEvent(
        completed=common_pb2.RunCompleted(
            message=common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, content="four words long here")
        )
    )
    kinds = {
        "queued": [(e.type, e.WhichOneof("data")) for e in run_events(run_row("queued"))],
        "running": [e.type for e in run_events(run_row("running"))],
        "completed": [
            e.type for e in run_events(run_row("completed"), run_event=completed.SerializeToString())
        ],
        "failed": [e.type for e in run_events(run_row("failed"))],
        "cancelled": [e.type for e in run_events(run_row("cancelled"))],
    }
    assert kinds == {
        "queued": [("run.queued", "run"), ("message.received", "message")],
        "running": ["run.started"],
        "completed": ["run.completed", "message.sent"],
        "failed": ["run.failed"],
        "cancelled": ["run.failed"],
    }
    done = run_events(run_row("completed"), run_event=completed.SerializeToString())
    assert done[0].run.queue_wait_ms >= 900 and done[0].run.duration_ms >= 1900
    assert done[1].message.length == len("four words long here")
    (cancelled,) = run_events(run_row("cancelled"))
    assert (
        cancelled.run.status == common_pb2.RUN_STATUS_CANCELLED and cancelled.run.error.reason == "CANCELLED"
    )
    error = common_pb2.RunError(code="UNAVAILABLE", reason="ALL_MODELS_FAILED").SerializeToString()
    (failed,) = run_events(run_row("failed", error=error))
    assert failed.run.error.reason == "ALL_MODELS_FAILED"


def test_runyard_events_prints_one_readable_line_per_event():
    from runyard.cli.events_commands import describe
    from runyard.common.protoutil import now

    end = common_pb2.LifecycleEvent(
        id=42,
        type="session.end",
        time=now(),
        session_id="s-1",
        session_key="chat:1",
        session_end=common_pb2.SessionEndData(
            reason=common_pb2.SESSION_END_REASON_COMPACTION,
            message_count=6,
            duration_ms=1500,
            next_session_id="s-2",
            next_session_key="chat:1",
        ),
    )
    line = describe(end)
    assert line.split()[0] == "42" and "session.end" in line and "chat:1 (s-1)" in line
    assert "COMPACTION after 1500 ms, 6 msgs, next s-2" in line
    run = common_pb2.LifecycleEvent(
        id=43,
        type="run.failed",
        time=now(),
        run_id="r-1",
        run=common_pb2.RunLifecycleData(
            status=common_pb2.RUN_STATUS_FAILED, error=common_pb2.RunError(reason="ALL_MODELS_FAILED")
        ),
    )
    assert describe(run).endswith("run r-1  FAILED ALL_MODELS_FAILED")


async def test_outbox_trim_keeps_recent_events_and_the_newest(pool):
    async with pool.acquire() as conn:
        await OUTBOX.emit(
            conn, [common_pb2.LifecycleEvent(type="session.start", org_id="o") for _ in range(5)]
        )
    await pool.execute("UPDATE gateway.outbox SET created_at = now() - interval '2 days'")
    async with pool.acquire() as conn:
        await OUTBOX.emit(conn, [common_pb2.LifecycleEvent(type="session.start", org_id="o")])
    newest = await pool.fetchval("SELECT max(pos) FROM gateway.outbox")
    assert await OUTBOX.trim(pool, 86_400, batch=2) == 5
    assert [r["pos"] for r in await pool.fetch("SELECT pos FROM gateway.outbox")] == [newest]
    await pool.execute("UPDATE gateway.outbox SET created_at = now() - interval '2 days'")
    assert await OUTBOX.trim(pool, 86_400) == 0  # the newest stays: the next position follows it
