"""Transcripts in the sessions store: token scope, one commit per run,
appended turns, compaction rollover, concurrent commits, reset purging
(real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common.auth import RunClaims
from runyard.common.errors import FailedPrecondition, NotFound, PermissionDenied, ResourceExhausted
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
        org_id=session.org_id,
        agent_id=session.agent_id,
        session_id=session.id,
        run_id=run_id or str(uuid.uuid4()),
        epoch=epoch,
        expires_at=int(time.time()) + 600,
    )


def message(role: int, text: str, run_id: str = "") -> common_pb2.Message:
    return common_pb2.Message(role=role, content=text, run_id=run_id)


def turn(token: RunClaims, text: str, base: sessions_pb2.TranscriptBase) -> sessions_pb2.TranscriptAppend:
    return sessions_pb2.TranscriptAppend(
        messages=[
            message(common_pb2.ROLE_USER, text, token.run_id),
            message(common_pb2.ROLE_ASSISTANT, f"re: {text}", token.run_id),
        ],
        base=base,
    )


async def run_turn(
    store: SessionStore,
    session: common_pb2.Session,
    text: str,
    *,
    compaction: sessions_pb2.TranscriptCompaction | None = None,
) -> tuple[str, str]:
    """One run as the worker and gateway do it; returns (run id, session id it landed in)."""
    token = claims(session)
    read = await store.read_transcript(token, session.id)
    append = turn(
        token, text, sessions_pb2.TranscriptBase(session_id=read.session_id, head_turn=read.head_turn)
    )
    if compaction is not None:
        append.compaction.CopyFrom(compaction)
    result = await store.commit_run(session.org_id, uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    return token.run_id, result.session_id


async def contents(store: SessionStore, key: str) -> tuple[str, list[str]]:
    _, data = await store.head_transcript("org", None, key)
    transcript = common_pb2.Transcript.FromString(data)
    return transcript.summary, [m.content for m in transcript.messages]


async def test_a_token_for_one_session_cannot_read_another(store):
    mine, _, _ = await store.resolve("org", "mine", "agent")
    theirs, _, _ = await store.resolve("org", "theirs", "agent")
    await run_turn(store, theirs, "their secret")
    token = claims(mine)
    with pytest.raises(PermissionDenied) as read:
        await store.read_transcript(token, theirs.id)
    other_agent = RunClaims(theirs.org_id, "another-agent", theirs.id, token.run_id, 1, token.expires_at)
    with pytest.raises(PermissionDenied) as agent:
        await store.read_transcript(other_agent)
    other_org = RunClaims("another-org", theirs.agent_id, theirs.id, token.run_id, 1, token.expires_at)
    with pytest.raises(Exception) as org:
        await store.read_transcript(other_org)
    assert read.value.reason == agent.value.reason == "TOKEN_SCOPE_MISMATCH"
    assert getattr(org.value, "reason", "") == "SESSION_NOT_FOUND"
    assert await contents(store, "theirs") == ("", ["their secret", "re: their secret"])


async def test_each_turn_stores_only_its_own_messages_and_a_run_commits_once(store):
    session, _, _ = await store.resolve("org", "long", "agent")
    sizes = []
    for i in range(30):
        await run_turn(store, session, f"message number {i:03d}")
        sizes.append(
            await store.pool.fetchval(
                "SELECT size_bytes FROM sessions.turns WHERE session_id = $1 ORDER BY turn DESC LIMIT 1",
                uuid.UUID(session.id),
            )
        )
    assert max(sizes) - min(sizes) <= 2  # bytes per turn do not grow with the conversation
    summary, texts = await contents(store, "long")
    assert len(texts) == 60 and texts[-2:] == ["message number 029", "re: message number 029"]
    assert (await store.get("org", None, "long")).message_count == 60

    # A repeat of a commit (even of another epoch) confirms the first one and writes nothing.
    token = claims(session)
    read = await store.read_transcript(token)
    base = sessions_pb2.TranscriptBase(session_id=read.session_id, head_turn=read.head_turn)
    first = await store.commit_run(
        "org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, turn(token, "x", base)
    )
    again = await store.commit_run(
        "org", uuid.UUID(session.id), uuid.UUID(token.run_id), 2, turn(token, "y", base)
    )
    assert (again.session_id, again.turn, again.events) == (first.session_id, first.turn, [])
    assert (await contents(store, "long"))[1][-2:] == ["x", "re: x"]
    assert (await store.read_transcript(claims(session, token.run_id, 2))).run_committed


async def test_compaction_commit_rolls_the_key_over_and_pairs_lifecycle_events(store):
    session, _, _ = await store.resolve("org", "long", "agent")
    for i in range(3):
        await run_turn(store, session, f"turn {i}")
    read = await store.read_transcript(claims(session), session.id)
    compaction = sessions_pb2.TranscriptCompaction(
        info=sessions_pb2.CompactionInfo(summarized_message_count=4, kept_message_count=2, model="echo/echo"),
        summary="turns 0 and 1 happened",
        kept=read.data and common_pb2.Transcript.FromString(read.data).messages[-2:],
    )
    _, landed = await run_turn(store, session, "turn 3", compaction=compaction)

    assert landed != session.id
    new = await store.get("org", None, "long")
    old = await store.get("org", uuid.UUID(session.id), "")
    assert new.id == landed and new.resumed_from_session_id == session.id
    assert old.next_session_id == landed and not old.current
    assert await contents(store, "long") == (
        "turns 0 and 1 happened",
        ["turn 2", "re: turn 2", "turn 3", "re: turn 3"],
    )
    # A run token minted for the old session (a run queued before the
    # rollover) follows the conversation to the new session.
    _, landed_after = await run_turn(store, session, "turn 4")
    assert landed_after == landed
    assert (await contents(store, "long"))[1][-2:] == ["turn 4", "re: turn 4"]

    rows = await store.pool.fetch("SELECT data FROM sessions.outbox ORDER BY pos")
    events = [from_proto(common_pb2.LifecycleEvent.FromString(r["data"])) for r in rows]
    end = [e for e in events if isinstance(e, SessionEnd)]
    start = [e for e in events if isinstance(e, SessionStart)]
    compaction_events = [e for e in events if isinstance(e, SessionCompacted)]
    assert [(e.session_id, e.reason, e.next_session_id, e.next_session_key) for e in end] == [
        (session.id, "COMPACTION", landed, "long")
    ]
    assert [(e.session_id, e.reason, e.resumed_from_session_id) for e in start] == [
        (session.id, "NEW", ""),
        (landed, "RESUMED", session.id),
    ]
    assert [
        (e.session_id, e.previous_session_id, e.summarized_message_count, e.kept_message_count)
        for e in compaction_events
    ] == [(landed, session.id, 4, 2)]


async def test_a_commit_after_another_runs_commit_is_appended_not_lost(store):
    session, _, _ = await store.resolve("org", "busy", "agent")
    await run_turn(store, session, "first")
    slow, fast = claims(session), claims(session)
    slow_read = await store.read_transcript(slow, session.id)
    # Another run commits while the slow one is generating.
    fast_read = await store.read_transcript(fast, session.id)
    fast_base = sessions_pb2.TranscriptBase(session_id=fast_read.session_id, head_turn=fast_read.head_turn)
    await store.commit_run(
        "org", uuid.UUID(session.id), uuid.UUID(fast.run_id), 1, turn(fast, "fast", fast_base)
    )
    # The slow run read the older head and asked to compact.
    slow_append = turn(
        slow,
        "slow",
        sessions_pb2.TranscriptBase(session_id=slow_read.session_id, head_turn=slow_read.head_turn),
    )
    slow_append.compaction.summary = "everything before"
    slow_append.compaction.info.summarized_message_count = 2
    result = await store.commit_run("org", uuid.UUID(session.id), uuid.UUID(slow.run_id), 1, slow_append)
    assert result.session_id == session.id  # the compaction was skipped: its view was stale
    assert result.message_count == 6
    assert await contents(store, "busy") == (
        "",
        ["first", "re: first", "fast", "re: fast", "slow", "re: slow"],
    )


async def test_reset_purges_the_session_and_its_compaction_predecessors(store):
    session, _, _ = await store.resolve("org", "forget", "agent")
    await run_turn(store, session, "secret")
    _, successor = await run_turn(
        store,
        session,
        "more",
        compaction=sessions_pb2.TranscriptCompaction(summary="the user said a secret"),
    )
    await store.reset("org", None, "forget")
    for sid in (session.id, successor):
        _, data = await store.head_transcript("org", uuid.UUID(sid), "")
        assert data == b""
    assert await store.pool.fetchval("SELECT count(*) FROM sessions.turns") == 0
    # A token minted before the reset cannot reach anything any more.
    with pytest.raises(FailedPrecondition) as ended:
        await store.read_transcript(claims(session))
    assert ended.value.reason == "SESSION_ENDED"
    assert await contents(store, "forget") == ("", [])
    # Nor can a commit of a run that was executing across the reset.
    stale = claims(session)
    with pytest.raises(FailedPrecondition) as commit:
        await store.commit_run(
            "org",
            uuid.UUID(session.id),
            uuid.UUID(stale.run_id),
            1,
            turn(stale, "late", sessions_pb2.TranscriptBase()),
        )
    assert commit.value.reason == "SESSION_ENDED"
    assert await contents(store, "forget") == ("", [])


async def test_archived_reset_transcripts_are_kept_but_never_served(store):
    store.archive_on_reset = True
    session, _, _ = await store.resolve("org", "archive", "agent")
    await run_turn(store, session, "kept for audit")
    await store.reset("org", None, "archive")
    _, data = await store.head_transcript("org", uuid.UUID(session.id), "")
    assert data == b""
    states = await store.pool.fetch("SELECT state FROM sessions.turns")
    assert [r["state"] for r in states] == ["archived"]


async def test_a_token_whose_successor_was_deleted_gets_a_clean_error(store):
    session, _, _ = await store.resolve("org", "gone", "agent")
    await run_turn(store, session, "hello")
    _, successor = await run_turn(
        store,
        session,
        "more",
        compaction=sessions_pb2.TranscriptCompaction(summary="hello happened"),
    )
    await store.delete("org", uuid.UUID(successor), "")
    # The conversation the old token followed is gone: not an internal error.
    pending = claims(session)
    with pytest.raises(FailedPrecondition) as read:
        await store.read_transcript(claims(session), session.id)
    with pytest.raises(FailedPrecondition) as commit:
        await store.commit_run(
            "org",
            uuid.UUID(session.id),
            uuid.UUID(pending.run_id),
            1,
            turn(pending, "x", sessions_pb2.TranscriptBase()),
        )
    assert read.value.reason == commit.value.reason == "SESSION_ENDED"


async def test_concurrent_repeats_of_a_commit_both_confirm_it(store):
    session, _, _ = await store.resolve("org", "twice", "agent")
    token = claims(session)
    append = turn(token, "hi", sessions_pb2.TranscriptBase(session_id=session.id))
    commit = store.commit_run("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    again = store.commit_run("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    first, second = await asyncio.gather(commit, again)
    assert (first.session_id, first.turn) == (second.session_id, second.turn)
    updated = await store.pool.fetchval("SELECT count(*) FROM sessions.outbox WHERE type = 'session.updated'")
    assert updated == 1
    assert (await contents(store, "twice"))[1] == ["hi", "re: hi"]


async def test_concurrent_resets_of_a_key_both_succeed(store):
    session, _, _ = await store.resolve("org", "again", "agent")
    results = await asyncio.gather(store.reset("org", None, "again"), store.reset("org", None, "again"))
    # One reset the original session, the other (it waited for the row) the
    # session the first one started.
    first, second = sorted(results, key=lambda result: result[1] != session.id)
    assert first[1] == session.id and second[1] == first[0].id
    assert (await store.get("org", None, "again")).id == second[0].id


async def test_concurrent_commits_of_one_session_each_get_their_own_turn(store):
    # A commit is one statement on the hot path: each waits for the session's lock and
    # must then append after the commits that got there first.
    session, _, _ = await store.resolve("org", "crowd", "agent")
    base = sessions_pb2.TranscriptBase(session_id=session.id)
    tokens = [claims(session) for _ in range(12)]
    results = await asyncio.gather(
        *(
            store.commit_run("org", uuid.UUID(session.id), uuid.UUID(t.run_id), 1, turn(t, f"m{i}", base))
            for i, t in enumerate(tokens)
        )
    )
    assert sorted(r.turn for r in results) == list(range(1, 13))
    assert max(r.message_count for r in results) == 24
    positions = [r.events[0].id for r in results]
    assert len(set(positions)) == 12 and all(positions)
    _, messages = await contents(store, "crowd")
    assert sorted(messages) == sorted([f"m{i}" for i in range(12)] + [f"re: m{i}" for i in range(12)])
    row = await store.pool.fetchrow(
        "SELECT head_turn, message_count FROM sessions.sessions WHERE id = $1", uuid.UUID(session.id)
    )
    assert (row["head_turn"], row["message_count"]) == (12, 24)


@pytest.mark.parametrize("seen", [True, False], ids=["session-seen-by-this-replica", "another-replica"])
async def test_a_commit_refused_says_why_whichever_replica_commits(store, seen):
    # The replica that resolved the session commits in one statement; another replica
    # (it never saw the session) reads the row first. Both refuse alike.
    session, _, _ = await store.resolve("org", "refused", "agent")
    other = SessionStore(store.pool, instance_id="sessions-other", max_snapshot_bytes=1 << 20)
    committer = store if seen else other
    base = sessions_pb2.TranscriptBase(session_id=session.id)
    token = claims(session)
    append = turn(token, "x" * 300, base)

    committer.max_snapshot_bytes = 200
    with pytest.raises(ResourceExhausted) as too_large:
        await committer.commit_run("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    assert too_large.value.reason == "SNAPSHOT_TOO_LARGE"
    committer.max_snapshot_bytes = 1 << 20

    with pytest.raises(NotFound) as wrong_org:
        await committer.commit_run("org-b", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    assert wrong_org.value.reason == "SESSION_NOT_FOUND"

    first = await committer.commit_run("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    again = await committer.commit_run("org", uuid.UUID(session.id), uuid.UUID(token.run_id), 1, append)
    assert (first.turn, first.message_count, len(first.events)) == (1, 2, 1)
    assert (again.turn, again.message_count, again.events) == (1, 2, [])

    await store.reset("org", None, "refused")
    late = claims(session)
    with pytest.raises(FailedPrecondition) as ended:
        await committer.commit_run(
            "org", uuid.UUID(session.id), uuid.UUID(late.run_id), 1, turn(late, "late", base)
        )
    assert ended.value.reason == "SESSION_ENDED"
