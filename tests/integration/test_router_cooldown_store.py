"""The shared cooldown table: the writer, replicas, versions, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from runyard._proto.v1 import common_pb2
from runyard.common import db
from runyard.common.config import RouterConfig
from runyard.common.outbox import Outbox
from runyard.router.cooldowns import CooldownKey, CooldownState, CooldownStore, Failure
from runyard.router.failures import FailoverReason

pytestmark = pytest.mark.timeout(30)

KEY = CooldownKey("p", "a", "m")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await db.migrate(database_url, "router")
    pool = await db.create_pool(database_url, min_size=1, max_size=6)
    yield pool
    await pool.close()


async def started(pool: asyncpg.Pool, url: str = "", **config: object) -> CooldownStore:
    store = CooldownStore(
        RouterConfig(**config), pool, database_url=url, outbox=Outbox("router", "test_events")
    )
    await store.start()
    return store


def failure(reason: str = FailoverReason.RATE_LIMIT, *, started_at: float | None = None) -> Failure:
    now = time.time()
    return Failure(reason, "boom", None, now if started_at is None else started_at, now)


async def test_cache_first_database_soon_with_the_event_in_the_same_transaction(pool):
    store = await started(pool)
    try:
        event = common_pb2.LifecycleEvent(type="model.failover", org_id="o")
        state = store.record_failure(KEY, failure(), event)
        assert store.blocking("p", "a", "m", time.time()) == state  # no database round trip needed
        await store.flush()
        row = await pool.fetchrow("SELECT * FROM router.cooldowns")
        assert (row["health"], row["failure_count"], row["version"]) == ("cooling", 1, 1)
        [stored] = await pool.fetch("SELECT data FROM router.outbox")
        decoded = common_pb2.LifecycleEvent.FromString(stored["data"])
        assert decoded.model.cooldown_key == "p/a/m"
        assert abs(decoded.model.cooldown_until.ToNanoseconds() / 1e9 - row["until"].timestamp()) < 1e-3
    finally:
        await store.close()


async def test_writes_survive_a_database_outage(pool, monkeypatch):
    store = await started(pool)
    real_write = store._write
    calls = 0

    async def flaky(batch):
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionResetError("connection lost")
        return await real_write(batch)

    monkeypatch.setattr(store, "_write", flaky)
    try:
        store.record_failure(KEY, failure())
        assert store.blocking("p", "a", "m", time.time()) is not None  # the hot path does not wait
        await store.flush(timeout_s=5)
        assert store.write_errors == 2
        assert await pool.fetchval("SELECT failure_count FROM router.cooldowns") == 1
    finally:
        await store.close()


async def test_two_replicas_serialize_on_the_row(pool, database_url):
    one = await started(pool, database_url)
    two = await started(pool, database_url)
    try:
        first = time.time()
        one.record_failure(KEY, failure(started_at=first))
        await one.flush()
        # Replica two's attempt started after the first failure: it escalates.
        await asyncio.sleep(0.01)
        two.record_failure(KEY, failure(started_at=time.time()))
        await two.flush()
        row = await pool.fetchrow("SELECT * FROM router.cooldowns")
        assert (row["failure_count"], row["version"]) == (2, 2)
        # Both caches converge on the committed row (NOTIFY).
        for store in (one, two):
            for _ in range(100):
                state = store.get(KEY)
                if state is not None and state.version == 2:
                    break
                await asyncio.sleep(0.02)
            assert store.get(KEY).failure_count == 2
        # A success on one replica clears it for both.
        one.record_success("p", "a", "m", attempt_started_at=time.time())
        await one.flush()
        for _ in range(100):
            if two.blocking("p", "a", "m", time.time()) is None:
                break
            await asyncio.sleep(0.02)
        assert two.blocking("p", "a", "m", time.time()) is None
    finally:
        await one.close()
        await two.close()


async def test_an_older_state_never_overwrites_a_newer_one(pool):
    store = await started(pool)
    try:
        newer = CooldownState(KEY, health="cooling", until=time.time() + 60, failure_count=3, version=5)
        older = CooldownState(KEY, health="ok", until=None, failure_count=0, version=4)
        assert store._apply(newer)
        assert not store._apply(older)
        assert store.get(KEY) == newer
    finally:
        await store.close()


async def test_a_late_success_from_before_the_failure_does_not_clear(pool):
    store = await started(pool)
    try:
        before = time.time() - 1
        store.record_failure(KEY, failure())
        store.record_success("p", "a", "m", attempt_started_at=before)
        await store.flush()
        assert store.blocking("p", "a", "m", time.time()) is not None
        assert await pool.fetchval("SELECT failure_count FROM router.cooldowns") == 1
    finally:
        await store.close()


async def test_refresh_loads_rows_written_by_others_and_drops_purged_ones(pool):
    store = await started(pool)
    try:
        await pool.execute(
            "INSERT INTO router.cooldowns (provider, auth_profile, model, health, until, failure_count, "
            "last_reason, version) VALUES ('x', '', 'gone', 'cooling', now() + interval '1 minute', 1, "
            "'MODEL_NOT_FOUND', 1)"
        )
        await store.refresh()
        assert store.blocking("x", "any", "gone", time.time()) is not None
        await pool.execute("DELETE FROM router.cooldowns")
        await pool.execute(
            "INSERT INTO router.cooldowns (provider, auth_profile, model, health, version) "
            "VALUES ('x', '', 'gone', 'ok', 2)"
        )
        await store.refresh()
        assert store.blocking("x", "any", "gone", time.time()) is None
    finally:
        await store.close()
