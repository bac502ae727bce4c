"""The transactional outbox on real PostgreSQL: positions of one transaction
follow each other across statements, readers are notified once per
transaction, and the insert is not planned anew on every execution (the
hot path runs it, inside the gateway's run completion and the sessions
service's commit, on every run)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common.outbox import Outbox, xid_of
from runyard.gateway.watch import OUTBOX as GATEWAY_OUTBOX
from runyard.sessions.store import EVENTS_CHANNEL as SESSIONS_CHANNEL

#: The sessions service's outbox (no relay columns), as its store builds it.
SESSIONS_OUTBOX = Outbox("sessions", SESSIONS_CHANNEL)

pytestmark = pytest.mark.timeout(60)


def events(*types: str) -> list[common_pb2.LifecycleEvent]:
    return [common_pb2.LifecycleEvent(type=kind, org_id="org") for kind in types]


@pytest.mark.parametrize("outbox", [GATEWAY_OUTBOX, SESSIONS_OUTBOX], ids=["gateway", "sessions"])
async def test_statements_of_one_transaction_number_their_events_one_after_another(
    pool, migrated_url: str, outbox: Outbox
):
    notified: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(migrated_url)
    await listener.add_listener(outbox.channel, lambda *args: notified.put_nowait(args[3]))
    try:
        async with pool.acquire() as conn, conn.transaction():
            first = await outbox.emit(conn, events("run.queued", "run.started"))
            second = await outbox.emit(conn, events("run.completed", "message.sent", "session.updated"))
            xid = await conn.fetchval("SELECT pg_current_xact_id()::text::bigint")
        # Readers are woken once, on commit, with the writing transaction's id.
        assert await asyncio.wait_for(notified.get(), 5) == str(xid)
        await asyncio.sleep(0.2)
        assert notified.empty()
    finally:
        await listener.close()
    positions = first + second
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert {xid_of(pos) for pos in positions} == {xid}
    assert [pos - (xid << 20) for pos in positions] == [1, 2, 3, 4, 5]
    stored = await pool.fetch(f"SELECT pos, type FROM {outbox.schema}.outbox ORDER BY pos")
    assert [(r["pos"], r["type"]) for r in stored] == list(
        zip(
            positions,
            ["run.queued", "run.started", "run.completed", "message.sent", "session.updated"],
            strict=True,
        )
    )


@pytest.mark.parametrize("outbox", [GATEWAY_OUTBOX, SESSIONS_OUTBOX], ids=["gateway", "sessions"])
async def test_the_insert_runs_on_a_generic_plan_once_postgresql_has_seen_it(pool, outbox: Outbox):
    # PostgreSQL plans a prepared statement's first five executions for their
    # values, then keeps one generic plan unless that plan looks costlier. The
    # insert must not look costlier: planned anew each time, it (with the
    # statements that embed it) cost about a tenth of PostgreSQL's CPU per run.
    async with pool.acquire() as conn:
        for count in range(1, 13):
            async with conn.transaction():
                await outbox.emit(conn, events(*["run.queued"] * (1 + count % 3)))
        generic, custom = await conn.fetchrow(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement LIKE $1",
            f"%INSERT INTO {outbox.schema}.outbox%",
        )
    assert (generic, custom) == (7, 5)
