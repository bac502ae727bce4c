"""Fixtures of the tests that need PostgreSQL but start no processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest


@pytest.fixture
async def pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own migrated database (every schema in place)."""
    pool = await asyncpg.create_pool(migrated_url, min_size=2, max_size=12)
    assert pool is not None
    yield pool
    await pool.close()
