"""Session maintenance against a real PostgreSQL: prune, cap, snapshot
retention, event trimming; a dry run changes nothing."""

from __future__ import annotations

import uuid

import asyncpg
import pytest
from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common.config import MaintenanceConfig
from runyard.common.hooks import SessionEnd, from_proto
from runyard.sessions.maintenance import Maintenance
from runyard.sessions.store import SessionStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def store(migrated_url: str):
    pool = await asyncpg.create_pool(migrated_url, min_size=1, max_size=4)
    store = SessionStore(pool, instance_id="sessions-test", max_snapshot_bytes=1 << 20)
    await store.register_instance(30)
    yield store
    await pool.close()


async def add_snapshots(pool: asyncpg.Pool, session_id: uuid.UUID, count: int, state: str = "completed",
                        age: str = "0 seconds") -> list[uuid.UUID]:
    ids = []
    for i in range(count):
        sid = uuid.uuid4()
        await pool.execute(
            """
            INSERT INTO sessions.snapshots (id, session_id, org_id, run_id, epoch, state, data, size_bytes,
                message_count, created_at)
            VALUES ($1, $2, 'org', $3, 1, $4, '\\x', 0, 0, now() - $5::text::interval + make_interval(secs => $6))
            """,
            sid, session_id, uuid.uuid4(), state, age, i,
        )
        ids.append(sid)
    await pool.execute("UPDATE sessions.sessions SET head_snapshot_id = $2 WHERE id = $1", session_id, ids[-1])
    return ids


async def fingerprint(pool: asyncpg.Pool) -> tuple:
    return (
        await pool.fetch("SELECT id, ended_at FROM sessions.sessions ORDER BY id"),
        await pool.fetch("SELECT id, state FROM sessions.snapshots ORDER BY id"),
        await pool.fetch("SELECT id, ended_at FROM sessions.activations ORDER BY id"),
        await pool.fetchval("SELECT count(*) FROM sessions.outbox"),
    )


async def setup_world(store: SessionStore) -> dict[str, uuid.UUID]:
    pool = store.pool
    ids: dict[str, uuid.UUID] = {}
    # Agent a: 8 sessions; s0-s1 idle for two days (s0 still has an open activation).
    for i in range(8):
        session, _ = await store.resolve("org", f"a{i}", "agent-a")
        ids[f"a{i}"] = uuid.UUID(session.id)
    # Agent b: 2 sessions (under the cap).
    for i in range(2):
        session, _ = await store.resolve("org", f"b{i}", "agent-b")
        ids[f"b{i}"] = uuid.UUID(session.id)
    # Activity order: a2 oldest ... a7 newest; a0/a1 idle for 2 days.
    for rank, key in enumerate(["a2", "a3", "a4", "a5", "a6", "a7"]):
        await pool.execute(
            "UPDATE sessions.sessions SET last_active_at = now() - make_interval(mins => $2) WHERE id = $1",
            ids[key], 60 - rank,
        )
    await pool.execute(
        "UPDATE sessions.sessions SET last_active_at = now() - interval '2 days' WHERE id = ANY($1::uuid[])",
        [ids["a0"], ids["a1"]],
    )
    # Only a0 (idle) and a3 (inside the cap's victims) keep an open activation.
    await pool.execute(
        "UPDATE sessions.activations SET ended_at = now(), end_reason = 'IDLE' "
        "WHERE session_id <> ALL($1::uuid[]) AND ended_at IS NULL",
        [ids["a0"], ids["a3"]],
    )
    await add_snapshots(pool, ids["a7"], 5)
    # Snapshots of sessions the pass removes go with them: a dry run must not count them.
    await add_snapshots(pool, ids["a1"], 4)
    await add_snapshots(pool, ids["a2"], 1, state="pending", age="2 hours")
    await add_snapshots(pool, ids["b0"], 1)
    await add_snapshots(pool, ids["b1"], 1, state="pending", age="2 hours")
    await pool.execute("UPDATE sessions.sessions SET head_snapshot_id = NULL WHERE id = $1", ids["b1"])
    await pool.execute("UPDATE sessions.outbox SET created_at = now() - interval '10 days' WHERE id <= 3")
    return ids


def config(**overrides: object) -> MaintenanceConfig:
    values: dict[str, object] = {
        "prune_after_s": 86_400, "max_sessions_per_agent": 4, "keep_snapshots": 2, "old_snapshots": "drop",
        "pending_snapshot_ttl_s": 3600, "event_retention_s": 5 * 86_400, "batch_size": 2,
    }
    values.update(overrides)
    return MaintenanceConfig(**values)


async def run(maintenance: Maintenance, dry_run: bool) -> tuple[list[sessions_pb2.PrunedSession], sessions_pb2.PruneStats]:
    pruned: list[sessions_pb2.PrunedSession] = []
    stats = None
    async for batch in maintenance.run(dry_run=dry_run):
        pruned += batch.sessions
        stats = batch.stats
        if batch.done:
            break
    assert stats is not None
    return pruned, stats


async def test_dry_run_reports_exactly_what_the_real_run_removes_and_changes_nothing(store):
    ids = await setup_world(store)
    names = {v: k for k, v in ids.items()}
    maintenance = Maintenance(store, config())
    before = await fingerprint(store.pool)
    dry, dry_stats = await run(maintenance, dry_run=True)
    assert await fingerprint(store.pool) == before

    real, real_stats = await run(maintenance, dry_run=False)
    key = lambda p: (names[uuid.UUID(p.session_id)], p.reason)
    assert sorted(map(key, dry)) == sorted(map(key, real))
    assert dry_stats == real_stats
    # Idle: a0, a1. Cap 4 of the remaining six of agent a (a2..a7): a2, a3 are
    # the oldest but a3 has an open activation, so only a2 goes.
    assert sorted(map(key, real)) == [
        ("a0", sessions_pb2.PRUNE_REASON_IDLE),
        ("a1", sessions_pb2.PRUNE_REASON_IDLE),
        ("a2", sessions_pb2.PRUNE_REASON_CAP),
    ]
    assert (real_stats.sessions_idle, real_stats.sessions_capped) == (2, 1)
    assert (real_stats.snapshots_dropped, real_stats.pending_snapshots_dropped) == (3, 1)
    assert real_stats.events_trimmed == 3

    left = {r["key"] for r in await store.pool.fetch("SELECT key FROM sessions.sessions")}
    assert left == {"a3", "a4", "a5", "a6", "a7", "b0", "b1"}
    kept = await store.pool.fetch(
        "SELECT sn.id, s.head_snapshot_id FROM sessions.snapshots sn "
        "JOIN sessions.sessions s ON s.id = sn.session_id WHERE sn.session_id = $1",
        ids["a7"],
    )
    assert len(kept) == 2 and any(r["id"] == r["head_snapshot_id"] for r in kept)

    # a0's open activation ended once, as DELETED, in the pruning transaction.
    rows = await store.pool.fetch("SELECT data FROM sessions.outbox WHERE type = 'session.end'")
    ends = [from_proto(common_pb2.LifecycleEvent.FromString(r["data"])) for r in rows]
    assert [(e.session_key, e.reason) for e in ends if isinstance(e, SessionEnd)] == [("a0", "DELETED")]

    again, again_stats = await run(maintenance, dry_run=False)
    assert again == [] and again_stats.sessions_idle == again_stats.sessions_capped == 0


async def test_archive_mode_keeps_old_snapshots_as_archived(store):
    ids = await setup_world(store)
    _, stats = await run(Maintenance(store, config(old_snapshots="archive", prune_after_s=0,
                                                   max_sessions_per_agent=0)), dry_run=False)
    # a7's three oldest, and a1's two oldest (nothing pruned here).
    assert (stats.snapshots_archived, stats.snapshots_dropped) == (5, 0)
    states = await store.pool.fetch("SELECT state FROM sessions.snapshots WHERE session_id = $1", ids["a7"])
    assert sorted(r["state"] for r in states) == ["archived", "archived", "archived", "completed", "completed"]


async def test_never_trims_the_newest_event(store):
    await store.resolve("org", "x", "agent")
    await store.resolve("org", "y", "agent")
    await store.pool.execute("UPDATE sessions.outbox SET created_at = now() - interval '30 days'")
    count = await store.pool.fetchval("SELECT count(*) FROM sessions.outbox")
    top = await store.pool.fetchval("SELECT max(pos) FROM sessions.outbox")
    _, stats = await run(Maintenance(store, config()), dry_run=False)
    assert stats.events_trimmed == count - 1
    assert [r["pos"] for r in await store.pool.fetch("SELECT pos FROM sessions.outbox")] == [top]
    await store.resolve("org", "z", "agent")
    assert await store.pool.fetchval("SELECT max(pos) FROM sessions.outbox") > top


async def test_schedule_is_claimed_by_one_instance_per_interval(store):
    maintenance = Maintenance(store, config(interval_s=3600))
    other = Maintenance(store, config(interval_s=3600))
    assert await maintenance.claim_schedule() is True
    assert await other.claim_schedule() is False
    assert await maintenance.claim_schedule() is False
