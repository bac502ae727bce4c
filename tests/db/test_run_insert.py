"""Queueing a message on real PostgreSQL: the one-statement insert for an
idle session (``gateway.lock_idle_session``, issue 10) against the general
path it falls back to.

The one statement takes the session's lock and then looks at the session
with a fresh snapshot; a stale one (taken before the lock wait) would let two
concurrent messages both find the session idle and both start.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.gateway.runs import RunStore

pytestmark = pytest.mark.timeout(60)


def _payload(session_id: uuid.UUID, text: str = "hello", key: str = "") -> common_pb2.RunPayload:
    return common_pb2.RunPayload(
        run_id=str(uuid.uuid4()),
        org_id="org",
        session_id=str(session_id),
        session_key=f"s-{session_id}",
        agent_id="default",
        input=common_pb2.RunInput(text=text),
        idempotency_key=key,
    )


class _Store(RunStore):
    """The real store, counting the statements that queued a run in one go."""

    def __init__(self, pool: asyncpg.Pool):
        super().__init__(pool, gateway_id="gw", lease_s=30, max_attempts=3, max_queued_per_session=100)
        self.one_statement = 0

    async def _insert_row(
        self, conn, payload, fingerprint, strategy, queued, claim_for, relayed, *, if_idle=False
    ):  # type: ignore[no-untyped-def]  # noqa: E501
        row = await super()._insert_row(
            conn, payload, fingerprint, strategy, queued, claim_for, relayed, if_idle=if_idle
        )
        self.one_statement += bool(if_idle and row is not None)
        return row


async def test_a_message_for_an_idle_session_is_queued_and_claimed_in_one_statement(pool):
    store = _Store(pool)
    session_id = uuid.uuid4()

    row, created = await store.insert(
        _payload(session_id), fingerprint=b"f", strategy="ENQUEUE", claim_for="worker-1"
    )

    assert created and store.one_statement == 1
    assert row["status"] == "running" and row["worker_id"] == "worker-1" and row["epoch"] == 1
    assert row["last_turn"] == 0
    queued = common_pb2.RunEvent.FromString(row["queued_event"])
    assert queued.WhichOneof("event") == "queued" and queued.queued.position == 0
    events = await pool.fetch("SELECT type FROM gateway.outbox ORDER BY pos")
    assert [e["type"] for e in events] == ["run.queued", "message.received", "run.started"]
    assert await pool.fetchval("SELECT count(*) FROM gateway.run_events WHERE run_id = $1", row["id"]) == 1


async def test_concurrent_messages_to_one_idle_session_start_one_run_and_queue_the_rest(pool):
    store = _Store(pool)
    session_id = uuid.uuid4()

    results = await asyncio.gather(
        *(
            store.insert(_payload(session_id, f"m{i}"), fingerprint=b"f", strategy="ENQUEUE", claim_for="w")
            for i in range(8)
        )
    )

    statuses = sorted(row["status"] for row, _ in results)
    assert statuses == ["queued"] * 7 + ["running"]
    assert all(created for _, created in results)
    # Exactly the first took the one statement; the others found it active.
    assert store.one_statement == 1
    queued = [common_pb2.RunEvent.FromString(row["queued_event"]).queued for row, _ in results]
    assert sorted(event.position for event in queued) == list(range(8))


async def test_concurrent_repeats_of_an_idempotency_key_make_one_run(pool):
    store = _Store(pool)

    results = await asyncio.gather(
        *(
            store.insert(_payload(uuid.uuid4(), key="k-1"), fingerprint=b"f", strategy="ENQUEUE")
            for _ in range(6)
        )
    )

    assert sum(created for _, created in results) == 1
    assert len({row["id"] for row, _ in results}) == 1
    assert await pool.fetchval("SELECT count(*) FROM gateway.runs") == 1


async def test_a_run_that_ends_while_the_insert_waits_for_the_session_lock_is_seen(pool):
    store = _Store(pool)
    session_id = uuid.uuid4()
    first, _ = await store.insert(_payload(session_id), fingerprint=b"f", strategy="ENQUEUE", claim_for="w")
    async with pool.acquire() as conn, conn.transaction():
        # What a completion does: the session's lock is not taken by it, but
        # an insert that started before it committed must see its outcome.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", str(session_id))
        waiting = asyncio.ensure_future(
            store.insert(_payload(session_id), fingerprint=b"f", strategy="ENQUEUE", claim_for="w")
        )
        await asyncio.sleep(0.3)  # the insert's statement is now waiting for the lock
        assert not waiting.done()
        await conn.execute(
            "UPDATE gateway.runs SET status = 'completed', ended_at = now(), transcript_turn = 7 "
            "WHERE id = $1",
            first["id"],
        )
    row, created = await waiting

    assert created and row["status"] == "running" and row["last_turn"] == 7
    assert store.one_statement == 2  # the fresh snapshot saw the session idle


async def test_a_busy_session_or_a_used_key_writes_nothing_in_the_one_statement(pool):
    store = _Store(pool)
    session_id = uuid.uuid4()
    await store.insert(_payload(session_id, key="k-2"), fingerprint=b"f", strategy="ENQUEUE", claim_for="w")
    before = await pool.fetchval("SELECT count(*) FROM gateway.outbox")

    repeat = await store._insert_row(
        pool, _payload(uuid.uuid4(), key="k-2"), b"f", "ENQUEUE", b"", None, (), if_idle=True
    )
    busy = await store._insert_row(pool, _payload(session_id), b"f", "ENQUEUE", b"", None, (), if_idle=True)

    assert repeat is None and busy is None
    assert await pool.fetchval("SELECT count(*) FROM gateway.runs") == 1
    assert await pool.fetchval("SELECT count(*) FROM gateway.outbox") == before
    assert await pool.fetchval("SELECT count(*) FROM gateway.run_events") == 1
