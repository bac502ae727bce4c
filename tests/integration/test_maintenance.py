"""Maintenance with real processes: `runyard sessions prune --dry-run`
changes nothing and lists what the real pass then removes; the scheduled pass
runs by itself."""

from __future__ import annotations

import asyncio
import os
import sys
import time

import asyncpg
import pytest

from tests.integration.test_lifecycle import resolve_many
from tests.stack import INTERNAL_SECRET

pytestmark = pytest.mark.timeout(120)


async def snapshot_of_state(url: str) -> tuple:
    conn = await asyncpg.connect(url)
    try:
        return (
            await conn.fetch("SELECT id, key, ended_at, last_active_at FROM sessions.sessions ORDER BY id"),
            await conn.fetch("SELECT id, ended_at FROM sessions.activations ORDER BY id"),
            await conn.fetchval("SELECT count(*) FROM sessions.outbox"),
        )
    finally:
        await conn.close()


async def prune_cli(stack, *flags: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNYARD_")}
    env["RUNYARD_INTERNAL_SECRET"] = INTERNAL_SECRET
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "runyard",
        "sessions",
        "prune",
        "--sessions",
        f"127.0.0.1:{stack.ports['sessions']}",
        *flags,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_prune_dry_run_changes_nothing_then_prunes_and_caps(stack_factory):
    stack = stack_factory(
        {
            "maintenance": {
                "enabled": False,
                "prune_after_s": 3600,
                "max_sessions_per_agent": 3,
                "batch_size": 2,
            },
        }
    )
    await stack.start_service("sessions")
    await resolve_many(stack, 8, "m")
    conn = await asyncpg.connect(stack.database_url)
    try:
        # m:0, m:1 idle for a day (m:0 still active in memory: its activation is open);
        # m:2..m:7 ordered by activity, only m:7 with an open activation.
        await conn.execute(
            "UPDATE sessions.sessions SET last_active_at = now() - interval '1 day' "
            "WHERE key IN ('m:0', 'm:1')"
        )
        for rank in range(2, 8):
            await conn.execute(
                "UPDATE sessions.sessions SET last_active_at = now() - make_interval(mins => $2) "
                "WHERE key = $1",
                f"m:{rank}",
                60 - rank,
            )
        await conn.execute(
            "UPDATE sessions.activations a SET ended_at = now(), end_reason = 'IDLE' "
            "FROM sessions.sessions s "
            "WHERE s.id = a.session_id AND s.key NOT IN ('m:0', 'm:7') AND a.ended_at IS NULL"
        )
    finally:
        await conn.close()
    before = await snapshot_of_state(stack.database_url)

    code, out, err = await prune_cli(stack, "--dry-run")
    assert code == 0, err
    assert await snapshot_of_state(stack.database_url) == before
    would = sorted(
        (line.split()[2], line.split()[3]) for line in out.splitlines() if line.startswith("would prune")
    )
    # Idle: m:0, m:1. Cap 3 of m:2..m:7 (newest m:7, m:6, m:5 stay): m:2, m:3, m:4.
    assert would == [("cap", "m:2"), ("cap", "m:3"), ("cap", "m:4"), ("idle", "m:0"), ("idle", "m:1")]
    assert "dry run: would prune 2 idle and 3 capped session(s)" in out and "nothing was changed" in out
    assert "so far]" in err  # progress

    code, out, err = await prune_cli(stack)
    assert code == 0, err
    gone = sorted(
        (line.split()[1], line.split()[2])
        for line in out.splitlines()
        if line.startswith("pruned ") and line.split()[1] in ("idle", "cap")
    )
    assert gone == [("cap", "m:2"), ("cap", "m:3"), ("cap", "m:4"), ("idle", "m:0"), ("idle", "m:1")]
    conn = await asyncpg.connect(stack.database_url)
    try:
        left = sorted(r["key"] for r in await conn.fetch("SELECT key FROM sessions.sessions"))
        ends = await conn.fetch("SELECT count(*) AS n FROM sessions.outbox WHERE type = 'session.end'")
    finally:
        await conn.close()
    assert left == ["m:5", "m:6", "m:7"]
    assert "pruned 2 idle and 3 capped session(s)" in out
    assert ends[0]["n"] == 1  # m:0's open activation ended (DELETED) with it

    code, out, _ = await prune_cli(stack)
    assert code == 0 and "pruned 0 idle and 0 capped session(s)" in out


async def test_scheduled_maintenance_runs_by_itself(stack_factory):
    stack = stack_factory(
        {
            "sessions": {"sweep_interval_s": 0.3},
            "maintenance": {"enabled": True, "interval_s": 1, "prune_after_s": 3600},
        }
    )
    await stack.start_service("sessions")
    await resolve_many(stack, 4, "sched")
    conn = await asyncpg.connect(stack.database_url)
    try:
        await conn.execute(
            "UPDATE sessions.sessions SET last_active_at = now() - interval '2 hours' "
            "WHERE key IN ('sched:0', 'sched:1')"
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            left = sorted(r["key"] for r in await conn.fetch("SELECT key FROM sessions.sessions"))
            if left == ["sched:2", "sched:3"]:
                break
            await asyncio.sleep(0.2)
    finally:
        await conn.close()
    assert left == ["sched:2", "sched:3"]
    await stack.wait_log("sessions", "maintenance: 2 idle and 0 capped session(s)", timeout_s=10)
