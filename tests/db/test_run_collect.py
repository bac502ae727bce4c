"""COLLECT on real PostgreSQL when the queued follow-up run is claimed between
being read and being merged into (a claim does not take the session's lock):
the message becomes a new queued run instead of failing (found by mypy,
issue 15)."""

from __future__ import annotations

import uuid

import pytest

from runyard._proto.v1 import common_pb2
from runyard.gateway.runs import RunStore

pytestmark = pytest.mark.timeout(60)


def _payload(session_id: uuid.UUID, text: str) -> common_pb2.RunPayload:
    return common_pb2.RunPayload(
        run_id=str(uuid.uuid4()),
        org_id="org",
        session_id=str(session_id),
        session_key="s",
        agent_id="default",
        input=common_pb2.RunInput(text=text),
    )


async def test_collect_into_a_follow_up_claimed_meanwhile_queues_a_new_run(pool, monkeypatch):
    store = RunStore(pool, gateway_id="gw", lease_s=10, max_attempts=3, max_queued_per_session=100)
    session_id = uuid.uuid4()
    first, created = await store.insert(
        _payload(session_id, "one"), fingerprint=b"1", strategy="COLLECT", claim_for="worker-1"
    )
    assert created and first["status"] == "running"
    follow_up, created = await store.insert(_payload(session_id, "two"), fingerprint=b"2", strategy="COLLECT")
    assert created and follow_up["status"] == "queued"

    collect_into = store._collect_into

    async def claimed_first(conn, row, payload):
        # What a dispatcher does once the first run ended: start the follow-up.
        await pool.execute("UPDATE gateway.runs SET status = 'completed' WHERE id = $1", first["id"])
        await pool.execute("UPDATE gateway.runs SET status = 'running' WHERE id = $1", row["id"])
        return await collect_into(conn, row, payload)

    monkeypatch.setattr(store, "_collect_into", claimed_first)
    third, created = await store.insert(_payload(session_id, "three"), fingerprint=b"3", strategy="COLLECT")

    assert created and third["status"] == "queued" and third["id"] != follow_up["id"]
    assert third["input_text"] == "three"
    # The follow-up that started keeps its own text.
    assert await pool.fetchval("SELECT input_text FROM gateway.runs WHERE id = $1", follow_up["id"]) == "two"
