"""Activation lifecycle in the sessions store against a real PostgreSQL:
every activation gets exactly one session.end, whoever ends it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.hooks import SessionEnd, SessionStart, from_proto
from runyard.sessions.store import SessionStore

pytestmark = pytest.mark.timeout(60)


async def make_store(pool: asyncpg.Pool, name: str, lease_s: float = 30.0) -> SessionStore:
    store = SessionStore(pool, instance_id=name, max_snapshot_bytes=1 << 20)
    await store.register_instance(lease_s)
    return store


async def lifecycle_events(pool: asyncpg.Pool) -> list:
    rows = await pool.fetch(
        "SELECT data FROM sessions.outbox WHERE type IN ('session.start', 'session.end') ORDER BY id"
    )
    return [from_proto(common_pb2.LifecycleEvent.FromString(r["data"])) for r in rows]


def assert_paired(events: list) -> None:
    """Per session: starts and ends alternate, start first; no activation ends twice."""
    open_: dict[str, bool] = {}
    for event in events:
        if isinstance(event, SessionStart):
            assert not open_.get(event.session_id), f"second start without an end: {event}"
            open_[event.session_id] = True
        else:
            assert open_.get(event.session_id), f"end without an open activation: {event}"
            open_[event.session_id] = False


async def test_every_activation_ends_once_whoever_ends_it(pool):
    store = await make_store(pool, "sessions-a")
    sessions = [await store.resolve("org", f"k{i}", "agent") for i in range(20)]
    again, created, events = await store.resolve("org", "k0", "agent")  # already active: no second start
    assert events == []
    assert not created and again.id == sessions[0][0].id
    for i in range(3):
        await store.reset("org", None, f"k{i}")
    for i in range(3, 5):
        await store.delete("org", None, f"k{i}")

    assert await store.end_owned("SHUTDOWN") == 15 + 3
    assert await store.end_owned("SHUTDOWN") == 0  # nothing twice

    events = await lifecycle_events(pool)
    assert_paired(events)
    ends = Counter(e.reason for e in events if isinstance(e, SessionEnd))
    assert ends == {"RESET": 3, "DELETED": 2, "SHUTDOWN": 18}
    starts = Counter(e.reason for e in events if isinstance(e, SessionStart))
    assert starts == {"NEW": 23}
    open_count = await pool.fetchval("SELECT count(*) FROM sessions.activations WHERE ended_at IS NULL")
    assert open_count == 0
    reset = [e for e in events if isinstance(e, SessionEnd) and e.reason == "RESET"]
    assert all(e.next_session_id and e.next_session_key == e.session_key for e in reset)
    shutdown = [e for e in events if isinstance(e, SessionEnd) and e.reason == "SHUTDOWN"]
    assert {e.session_key for e in shutdown} >= {f"k{i}" for i in range(5, 20)}
    assert all(e.agent_id == "agent" and e.org_id == "org" and e.duration_ms >= 0 for e in shutdown)


async def test_session_end_carries_message_count_and_duration(pool):
    store = await make_store(pool, "sessions-a")
    session, _, _ = await store.resolve("org", "counted", "agent")
    await pool.execute("UPDATE sessions.sessions SET message_count = 7 WHERE id = $1", uuid.UUID(session.id))
    await pool.execute(
        "UPDATE sessions.activations SET started_at = now() - interval '90 seconds' WHERE session_id = $1",
        uuid.UUID(session.id),
    )
    await store.end_owned("RESTART")
    (end,) = [e for e in await lifecycle_events(pool) if isinstance(e, SessionEnd)]
    assert (end.reason, end.message_count, end.session_key) == ("RESTART", 7, "counted")
    assert 89_000 <= end.duration_ms <= 120_000


async def test_crash_recovery_ends_lapsed_instances_activations_once_across_recoverers(pool):
    dead = await make_store(pool, "sessions-dead")
    for i in range(300):
        await dead.resolve("org", f"c{i}", "agent")
    alive = await make_store(pool, "sessions-alive")
    await alive.resolve("org", "mine", "agent")

    assert await alive.recover_crashed() == 0  # the dead instance's lease has not lapsed yet
    await pool.execute(
        "UPDATE sessions.instances SET lease_expires_at = now() - interval '1 second' WHERE instance_id = $1",
        "sessions-dead",
    )
    other = await make_store(pool, "sessions-other")
    counts = await asyncio.gather(alive.recover_crashed(batch=50), other.recover_crashed(batch=50))
    assert sum(counts) == 300
    assert await alive.recover_crashed() == 0
    assert await other.recover_crashed() == 0

    events = await lifecycle_events(pool)
    assert_paired(events)
    recovered = [e for e in events if isinstance(e, SessionEnd)]
    assert len(recovered) == 300 and {e.reason for e in recovered} == {"CRASH_RECOVERED"}
    assert len({e.session_id for e in recovered}) == 300
    # The live instance's own activation is untouched.
    assert await alive.count_owned() == 1


async def test_a_dead_instances_session_used_again_is_recovered_before_it_resumes(pool):
    dead = await make_store(pool, "sessions-dead")
    session, _, _ = await dead.resolve("org", "live-chat", "agent")
    await pool.execute(
        "UPDATE sessions.instances SET lease_expires_at = now() - interval '1 second' WHERE instance_id = $1",
        "sessions-dead",
    )
    alive = await make_store(pool, "sessions-alive")
    # The conversation goes on before any crash-recovery sweep ran.
    again, created, events = await alive.resolve("org", "live-chat", "agent")
    assert (again.id, created) == (session.id, False)
    assert [(e.type, e.session_end.reason, e.session_start.reason) for e in events] == [
        ("session.end", common_pb2.SESSION_END_REASON_CRASH_RECOVERED, 0),
        ("session.start", 0, common_pb2.SESSION_START_REASON_RESUMED),
    ]
    assert all(e.id for e in events)  # with their outbox positions, for the gateway
    assert await alive.recover_crashed() == 0  # nothing left for the sweep (it would end the live one)
    assert await alive.count_owned() == 1
    assert_paired(await lifecycle_events(pool))
    # Touched again: nothing to write.
    assert (await alive.resolve("org", "live-chat", "agent"))[2] == []


async def test_stopped_instance_leftovers_are_recovered(pool):
    stopped = await make_store(pool, "sessions-stopped")
    await stopped.resolve("org", "late", "agent")
    # A stop that marked the instance stopped but (say) lost a straggler.
    await pool.execute(
        "UPDATE sessions.instances SET stopped_at = now() WHERE instance_id = 'sessions-stopped'"
    )
    other = await make_store(pool, "sessions-other")
    assert await other.recover_crashed() == 1


async def test_idle_expiry_ends_only_idle_owned_activations_and_a_new_message_resumes(pool):
    store = await make_store(pool, "sessions-a")
    other = await make_store(pool, "sessions-b")
    for i in range(5):
        await store.resolve("org", f"i{i}", "agent")
    await other.resolve("org", "theirs", "agent")
    await pool.execute(
        "UPDATE sessions.sessions SET last_active_at = now() - interval '2 hours' "
        "WHERE key IN ('i0', 'i1', 'theirs')"
    )
    assert await store.expire_idle(3600) == 2  # not the other instance's
    assert await store.expire_idle(3600) == 0
    _, created, resumed_events = await store.resolve("org", "i0", "agent")
    assert not created and [e.type for e in resumed_events] == ["session.start"]
    events = await lifecycle_events(pool)
    assert_paired(events)
    ends = [e for e in events if isinstance(e, SessionEnd)]
    assert sorted((e.session_key, e.reason) for e in ends) == [("i0", "IDLE"), ("i1", "IDLE")]
    resumed = [e for e in events if isinstance(e, SessionStart) and e.session_key == "i0"]
    assert [e.reason for e in resumed] == ["NEW", "RESUMED"]


async def test_lease_renewal_reports_a_lapsed_lease(pool):
    store = await make_store(pool, "sessions-a", lease_s=30)
    assert await store.renew_lease(30) is True
    await pool.execute("UPDATE sessions.instances SET lease_expires_at = now() - interval '1 second'")
    assert await store.renew_lease(30) is False
    assert await pool.fetchval("SELECT lease_expires_at > now() FROM sessions.instances") is True


async def test_listeners_get_the_committed_events(pool):
    store = await make_store(pool, "sessions-a")
    seen: list[str] = []
    store.listeners.append(lambda events: seen.extend(e.type for e in events))
    store.listeners.insert(0, lambda events: 1 / 0)  # a broken listener never breaks the change
    await store.resolve("org", "x", "agent")
    await store.end_owned("SHUTDOWN")
    assert seen == ["session.start", "session.end"]


@pytest.mark.parametrize("argv", [["serve", "sessions", "--restart-expected"], ["up", "--restart-expected"]])
def test_restart_expected_flag_makes_the_sessions_service_end_with_restart(argv, monkeypatch):
    from runyard.cli.main import build_parser
    from runyard.common.config import load_config
    from runyard.sessions.flags import RESTART_ENV

    monkeypatch.delenv(RESTART_ENV, raising=False)
    assert load_config(environ=dict(os.environ)).sessions.shutdown_mode == "shutdown"
    monkeypatch.setenv(RESTART_ENV, "shutdown")  # restored afterwards
    args = build_parser().parse_args(argv)
    assert args.restart_expected is True
    # Children (`runyard up` starts the services) inherit the environment.
    assert load_config(environ=dict(os.environ)).sessions.shutdown_mode == "restart"
