"""Session maintenance against a real PostgreSQL: prune, cap, snapshot
retention, event trimming; a dry run changes nothing."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common.auth import RunClaims
from runyard.common.config import MaintenanceConfig
from runyard.common.hooks import from_proto
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


async def commit(
    store: SessionStore, session: common_pb2.Session, text: str, *, compact: bool = False
) -> str:
    """One run's commit, as the gateway makes it; returns the session it landed in."""
    claims = RunClaims(
        session.org_id, session.agent_id, session.id, str(uuid.uuid4()), 1, int(time.time()) + 600
    )
    read = await store.read_transcript(claims)
    append = sessions_pb2.TranscriptAppend(
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content=text, run_id=claims.run_id)],
        base=sessions_pb2.TranscriptBase(session_id=read.session_id, head_turn=read.head_turn),
    )
    if compact:
        append.compaction.summary = f"before {text}"
        append.compaction.info.summarized_message_count = 1
    result = await store.commit_run("org", uuid.UUID(session.id), uuid.UUID(claims.run_id), 1, append)
    return result.session_id


async def fingerprint(pool: asyncpg.Pool) -> tuple:
    return (
        await pool.fetch("SELECT id, ended_at FROM sessions.sessions ORDER BY id"),
        await pool.fetch("SELECT session_id, turn, state FROM sessions.turns ORDER BY session_id, turn"),
        await pool.fetch("SELECT id, ended_at FROM sessions.activations ORDER BY id"),
        await pool.fetchval("SELECT count(*) FROM sessions.outbox"),
    )


async def setup_world(store: SessionStore) -> dict[str, uuid.UUID]:
    pool = store.pool
    ids: dict[str, uuid.UUID] = {}
    # Agent a: 8 sessions; s0-s1 idle for two days (s0 still has an open activation).
    for i in range(8):
        session, _, _ = await store.resolve("org", f"a{i}", "agent-a")
        ids[f"a{i}"] = uuid.UUID(session.id)
    # Agent b: b0 compacted twice (b0 -> b0x -> b0y, the current one), and b1;
    # four sessions, under the cap.
    b0, _, _ = await store.resolve("org", "b0", "agent-b")
    ids["b0"] = uuid.UUID(b0.id)
    await commit(store, b0, "t1")
    ids["b0x"] = uuid.UUID(await commit(store, b0, "t2", compact=True))
    b0x = await store.get("org", ids["b0x"], "")
    await commit(store, b0x, "t3")
    ids["b0y"] = uuid.UUID(await commit(store, b0x, "t4", compact=True))
    b1, _, _ = await store.resolve("org", "b1", "agent-b")
    ids["b1"] = uuid.UUID(b1.id)
    # Agent c: c0 compacted into c1; c0 is idle for two days (pruned, so its
    # old turns are not counted as trimmed).
    c0, _, _ = await store.resolve("org", "c0", "agent-c")
    ids["c0"] = uuid.UUID(c0.id)
    await commit(store, c0, "u1")
    ids["c1"] = uuid.UUID(await commit(store, c0, "u2", compact=True))
    # Activity order: a2 oldest ... a7 newest; a0/a1/c0 idle for 2 days.
    for rank, key in enumerate(["a2", "a3", "a4", "a5", "a6", "a7"]):
        await pool.execute(
            "UPDATE sessions.sessions SET last_active_at = now() - make_interval(mins => $2) WHERE id = $1",
            ids[key],
            60 - rank,
        )
    await pool.execute(
        "UPDATE sessions.sessions SET last_active_at = now() - interval '2 days' WHERE id = ANY($1::uuid[])",
        [ids["a0"], ids["a1"], ids["c0"]],
    )
    # Only a0 (idle) and a3 (inside the cap's victims) keep an open activation.
    await pool.execute(
        "UPDATE sessions.activations SET ended_at = now(), end_reason = 'IDLE' "
        "WHERE session_id <> ALL($1::uuid[]) AND ended_at IS NULL",
        [ids["a0"], ids["a3"]],
    )
    await pool.execute(
        "UPDATE sessions.outbox SET created_at = now() - interval '10 days' "
        "WHERE id IN (SELECT id FROM sessions.outbox ORDER BY pos LIMIT 3)"
    )
    return ids


def config(**overrides: object) -> MaintenanceConfig:
    values: dict[str, object] = {
        "prune_after_s": 86_400,
        "max_sessions_per_agent": 4,
        "keep_snapshots": 2,
        "old_snapshots": "drop",
        "pending_snapshot_ttl_s": 3600,
        "event_retention_s": 5 * 86_400,
        "batch_size": 2,
    }
    values.update(overrides)
    return MaintenanceConfig(**values)


async def run(
    maintenance: Maintenance, dry_run: bool
) -> tuple[list[sessions_pb2.PrunedSession], sessions_pb2.PruneStats]:
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
    maintenance = Maintenance(store, config(keep_snapshots=1))
    before = await fingerprint(store.pool)
    dry, dry_stats = await run(maintenance, dry_run=True)
    assert await fingerprint(store.pool) == before

    real, real_stats = await run(maintenance, dry_run=False)

    def key(p):
        return names[uuid.UUID(p.session_id)], p.reason

    assert sorted(map(key, dry)) == sorted(map(key, real))
    assert dry_stats == real_stats
    # Idle: a0, a1, c0. Cap 4 of the remaining six of agent a (a2..a7): a2,
    # a3 are the oldest but a3 has an open activation, so only a2 goes.
    assert sorted(map(key, real)) == [
        ("a0", sessions_pb2.PRUNE_REASON_IDLE),
        ("a1", sessions_pb2.PRUNE_REASON_IDLE),
        ("a2", sessions_pb2.PRUNE_REASON_CAP),
        ("c0", sessions_pb2.PRUNE_REASON_IDLE),
    ]
    assert (real_stats.sessions_idle, real_stats.sessions_capped) == (3, 1)
    # keep_snapshots = 1: the turns of b0 (1) and b0x (2) go; c0's went with c0.
    assert (real_stats.snapshots_dropped, real_stats.snapshots_archived) == (3, 0)
    assert real_stats.events_trimmed == 3

    left = {r["key"] for r in await store.pool.fetch("SELECT DISTINCT key FROM sessions.sessions")}
    assert left == {"a3", "a4", "a5", "a6", "a7", "b0", "b1", "c0"}  # b0x/b0y/c1 keep their keys
    turns = await store.pool.fetch("SELECT session_id, turn FROM sessions.turns ORDER BY session_id, turn")
    assert sorted((names[r["session_id"]], r["turn"]) for r in turns) == [("b0y", 1), ("c1", 1)]
    # The current transcript is whole.
    _, data = await store.head_transcript("org", None, "b0")
    transcript = common_pb2.Transcript.FromString(data)
    assert (transcript.summary, [m.content for m in transcript.messages]) == ("before t4", ["t4"])

    # a0's open activation ended once, as DELETED, in the pruning transaction.
    rows = await store.pool.fetch("SELECT data FROM sessions.outbox WHERE type = 'session.end'")
    ends = [from_proto(common_pb2.LifecycleEvent.FromString(r["data"])) for r in rows]
    assert [(e.session_key, e.reason) for e in ends if e.reason != "COMPACTION"] == [("a0", "DELETED")]

    again, again_stats = await run(maintenance, dry_run=False)
    assert again == [] and again_stats.sessions_idle == again_stats.sessions_capped == 0


async def test_archive_mode_keeps_old_transcripts_as_archived_and_never_serves_them(store):
    ids = await setup_world(store)
    _, stats = await run(
        Maintenance(store, config(old_snapshots="archive", prune_after_s=0, max_sessions_per_agent=0)),
        dry_run=False,
    )
    # keep_snapshots = 2: b0 is two compactions behind b0y (its one turn goes);
    # b0x and c0 are one behind.
    assert (stats.snapshots_archived, stats.snapshots_dropped) == (1, 0)
    states = await store.pool.fetch("SELECT state FROM sessions.turns WHERE session_id = $1", ids["b0"])
    assert [r["state"] for r in states] == ["archived"]
    _, data = await store.head_transcript("org", ids["b0"], "")
    assert common_pb2.Transcript.FromString(data).messages == []


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
