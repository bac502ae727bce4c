"""Fixtures of the tests that need PostgreSQL but start no processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

#: How long the pool's close may wait for connections a failed test still holds.
POOL_CLOSE_TIMEOUT_S = 10.0


@pytest.fixture
async def pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own migrated database (every schema in place).

    Closed at teardown, and terminated if a connection is still held after
    :data:`POOL_CLOSE_TIMEOUT_S`: pytest-timeout stops timing a test once it
    has failed (its ``pytest_exception_interact`` hook cancels the timer), so
    a close that waits for a connection the failed test never released would
    otherwise hold up the whole run for good.
    """
    pool = await asyncpg.create_pool(migrated_url, min_size=2, max_size=12)
    assert pool is not None
    yield pool
    try:
        async with asyncio.timeout(POOL_CLOSE_TIMEOUT_S):
            await pool.close()
    except TimeoutError:
        pool.terminate()
