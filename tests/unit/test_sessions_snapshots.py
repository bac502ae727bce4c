"""Snapshots in the sessions store: token scope, compaction rollover,
rebase of concurrent commits, reset purging (real PostgreSQL)."""

from __future__ import annotations

import time
import uuid

import asyncpg
import pytest
from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common.auth import RunClaims
from runyard.common.errors import FailedPrecondition, PermissionDenied
from runyard.common.hooks import SessionCompacted, SessionEnd, SessionStart, from_proto
from runyard.sessions.store import SessionStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def store(migrated_url: str):
    pool = await asyncpg.create_pool(migrated_url, min_size=1, max_size=4)
    store = SessionStore(pool, instance_id="sessions-test", max_snapshot_bytes=1 << 20)
    await store.register_instance(30)
    yield store
    await pool.close()


def claims(session: common_pb2.Session, run_id: str | None = None, epoch: int = 1) -> RunClaims:
    return RunClaims(
        org_id=session.org_id, agent_id=session.agent_id, session_id=session.id,
        run_id=run_id or str(uuid.uuid4()), epoch=epoch, expires_at=int(time.time()) + 600,
    )


def message(role: int, text: str, run_id: str = "") -> common_pb2.Message:
    return common_pb2.Message(role=role, content=text, run_id=run_id)


async def run_turn(
    store: SessionStore,
    session: common_pb2.Session,
    text: str,
    *,
    compaction: sessions_pb2.CompactionInfo | None = None,
    transcript: common_pb2.Transcript | None = None,
) -> tuple[str, str]:
    """One run as the worker and gateway do it; returns (run id, session id it landed in)."""
    token = claims(session)
    read = await store.get_snapshot(token, session.id)
    base = common_pb2.Transcript.FromString(read.data) if transcript is None else transcript
    base.messages.append(message(common_pb2.ROLE_USER, text, token.run_id))
    base.messages.append(message(common_pb2.ROLE_ASSISTANT, f"re: {text}", token.run_id))
    await store.put_snapshot(
        token, base.SerializeToString(), len(base.messages), session_id=session.id,
        base_snapshot_id=read.snapshot_id, compaction=compaction,
    )
    _, _, landed = await store.commit_snapshot(session.org_id, uuid.UUID(session.id), uuid.UUID(token.run_id), 1)
    return token.run_id, landed


async def contents(store: SessionStore, key: str) -> tuple[str, list[str]]:
    _, data = await store.head_transcript("org", None, key)
    transcript = common_pb2.Transcript.FromString(data)
    return transcript.summary, [m.content for m in transcript.messages]


async def test_a_token_for_one_session_cannot_read_or_write_another(store):
    mine, _ = await store.resolve("org", "mine", "agent")
    theirs, _ = await store.resolve("org", "theirs", "agent")
    await run_turn(store, theirs, "their secret")
    token = claims(mine)
    with pytest.raises(PermissionDenied) as read:
        await store.get_snapshot(token, theirs.id)
    with pytest.raises(PermissionDenied) as write:
        await store.put_snapshot(token, b"", 0, session_id=theirs.id)
    with pytest.raises(PermissionDenied) as compact:
        await store.put_snapshot(
            token, b"", 0, session_id=theirs.id, compaction=sessions_pb2.CompactionInfo(summarized_message_count=2)
        )
    other_agent = RunClaims(theirs.org_id, "another-agent", theirs.id, token.run_id, 1, token.expires_at)
    with pytest.raises(PermissionDenied):
        await store.get_snapshot(other_agent)
    for error in (read, write, compact):
        assert error.value.reason == "TOKEN_SCOPE_MISMATCH"
    assert await contents(store, "theirs") == ("", ["their secret", "re: their secret"])
    assert await store.pool.fetchval("SELECT count(*) FROM sessions.snapshots WHERE state = 'pending'") == 0


async def test_compaction_commit_rolls_the_key_over_and_pairs_lifecycle_events(store):
    session, _ = await store.resolve("org", "long", "agent")
    for i in range(3):
        await run_turn(store, session, f"turn {i}")
    compacted = common_pb2.Transcript(summary="turns 0 and 1 happened", resumed_from_session_id=session.id)
    read = await store.get_snapshot(claims(session), session.id)
    compacted.messages.extend(common_pb2.Transcript.FromString(read.data).messages[-2:])
    info = sessions_pb2.CompactionInfo(summarized_message_count=4, kept_message_count=2, model="echo/echo")
    _, landed = await run_turn(store, session, "turn 3", compaction=info, transcript=compacted)

    assert landed != session.id
    new = await store.get("org", None, "long")
    old = await store.get("org", uuid.UUID(session.id), "")
    assert new.id == landed and new.resumed_from_session_id == session.id
    assert old.next_session_id == landed and not old.current
    assert await contents(store, "long") == (
        "turns 0 and 1 happened", ["turn 2", "re: turn 2", "turn 3", "re: turn 3"]
    )
    # A run token minted for the old session (a run queued before the
    # rollover) follows the conversation to the new session.
    _, landed_after = await run_turn(store, session, "turn 4")
    assert landed_after == landed
    assert (await contents(store, "long"))[1][-2:] == ["turn 4", "re: turn 4"]

    rows = await store.pool.fetch("SELECT data FROM sessions.outbox ORDER BY id")
    events = [from_proto(common_pb2.LifecycleEvent.FromString(r["data"])) for r in rows]
    end = [e for e in events if isinstance(e, SessionEnd)]
    start = [e for e in events if isinstance(e, SessionStart)]
    compaction_events = [e for e in events if isinstance(e, SessionCompacted)]
    assert [(e.session_id, e.reason, e.next_session_id, e.next_session_key) for e in end] == [
        (session.id, "COMPACTION", landed, "long")
    ]
    assert [(e.session_id, e.reason, e.resumed_from_session_id) for e in start] == [
        (session.id, "NEW", ""), (landed, "RESUMED", session.id)
    ]
    assert [(e.session_id, e.previous_session_id, e.summarized_message_count, e.kept_message_count)
            for e in compaction_events] == [(landed, session.id, 4, 2)]


async def test_a_commit_after_another_runs_commit_is_rebased_not_lost(store):
    session, _ = await store.resolve("org", "busy", "agent")
    await run_turn(store, session, "first")
    slow, fast = claims(session), claims(session)
    slow_read = await store.get_snapshot(slow, session.id)
    # Another run commits while the slow one is generating.
    fast_read = await store.get_snapshot(fast, session.id)
    t = common_pb2.Transcript.FromString(fast_read.data)
    t.messages.extend([message(common_pb2.ROLE_USER, "fast", fast.run_id), message(3, "re: fast", fast.run_id)])
    await store.put_snapshot(fast, t.SerializeToString(), len(t.messages), base_snapshot_id=fast_read.snapshot_id)
    await store.commit_snapshot("org", uuid.UUID(session.id), uuid.UUID(fast.run_id), 1)
    # The slow run's transcript was built on the older head and asked to compact.
    t = common_pb2.Transcript.FromString(slow_read.data)
    t.messages.extend([message(common_pb2.ROLE_USER, "slow", slow.run_id), message(3, "re: slow", slow.run_id)])
    await store.put_snapshot(
        slow, t.SerializeToString(), len(t.messages), base_snapshot_id=slow_read.snapshot_id,
        compaction=sessions_pb2.CompactionInfo(summarized_message_count=2),
    )
    _, count, landed = await store.commit_snapshot("org", uuid.UUID(session.id), uuid.UUID(slow.run_id), 1)
    assert landed == session.id  # the compaction was skipped: its transcript was stale
    assert count == 6
    assert (await contents(store, "busy"))[1] == ["first", "re: first", "fast", "re: fast", "slow", "re: slow"]


async def test_reset_purges_the_session_and_its_compaction_predecessors(store):
    session, _ = await store.resolve("org", "forget", "agent")
    await run_turn(store, session, "secret")
    compacted = common_pb2.Transcript(summary="the user said a secret")
    _, successor = await run_turn(
        store, session, "more", compaction=sessions_pb2.CompactionInfo(summarized_message_count=2),
        transcript=compacted,
    )
    await store.reset("org", None, "forget")
    for sid in (session.id, successor):
        _, data = await store.head_transcript("org", uuid.UUID(sid), "")
        assert data == b""
    assert await store.pool.fetchval("SELECT count(*) FROM sessions.snapshots") == 0
    # A token minted before the reset cannot reach anything any more.
    with pytest.raises(FailedPrecondition) as ended:
        await store.get_snapshot(claims(session))
    assert ended.value.reason == "SESSION_ENDED"
    assert await contents(store, "forget") == ("", [])


async def test_archived_reset_snapshots_are_kept_but_never_served(store):
    store.archive_on_reset = True
    session, _ = await store.resolve("org", "archive", "agent")
    await run_turn(store, session, "kept for audit")
    await store.reset("org", None, "archive")
    _, data = await store.head_transcript("org", uuid.UUID(session.id), "")
    assert data == b""
    states = await store.pool.fetch("SELECT state FROM sessions.snapshots")
    assert [r["state"] for r in states] == ["archived"]


async def test_a_token_whose_successor_was_deleted_gets_a_clean_error(store):
    session, _ = await store.resolve("org", "gone", "agent")
    await run_turn(store, session, "hello")
    _, successor = await run_turn(
        store, session, "more", compaction=sessions_pb2.CompactionInfo(summarized_message_count=2),
        transcript=common_pb2.Transcript(summary="hello happened"),
    )
    pending = claims(session)
    await store.put_snapshot(pending, b"", 0, session_id=session.id)
    await store.delete("org", uuid.UUID(successor), "")
    # The conversation the old token followed is gone: not an internal error.
    with pytest.raises(FailedPrecondition) as read:
        await store.get_snapshot(claims(session), session.id)
    with pytest.raises(FailedPrecondition) as commit:
        await store.commit_snapshot("org", uuid.UUID(session.id), uuid.UUID(pending.run_id), 1)
    assert read.value.reason == commit.value.reason == "SESSION_ENDED"


async def test_concurrent_repeats_of_a_commit_both_confirm_it(store):
    import asyncio

    session, _ = await store.resolve("org", "twice", "agent")
    token = claims(session)
    t = common_pb2.Transcript(messages=[message(common_pb2.ROLE_USER, "hi", token.run_id)])
    await store.put_snapshot(token, t.SerializeToString(), 1, session_id=session.id)
    commit = store.commit_snapshot("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1)
    again = store.commit_snapshot("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1)
    first, second = await asyncio.gather(commit, again)
    assert first == second
    updated = await store.pool.fetchval("SELECT count(*) FROM sessions.outbox WHERE type = 'session.updated'")
    assert updated == 1


async def test_concurrent_resets_of_a_key_both_succeed(store):
    import asyncio

    session, _ = await store.resolve("org", "again", "agent")
    results = await asyncio.gather(store.reset("org", None, "again"), store.reset("org", None, "again"))
    # One reset the original session, the other (it waited for the row) the
    # session the first one started.
    first, second = sorted(results, key=lambda result: result[1] != session.id)
    assert first[1] == session.id and second[1] == first[0].id
    assert (await store.get("org", None, "again")).id == second[0].id
