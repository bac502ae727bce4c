"""Fixtures of the tests that need PostgreSQL but start no processes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support import close_pool


@pytest.fixture
async def pool(migrated_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on this test's own migrated database (every schema in place);
    closed at teardown within a bound (:func:`tests.support.close_pool`)."""
    pool = await asyncpg.create_pool(migrated_url, min_size=2, max_size=12)
    assert pool is not None
    yield pool
    await close_pool(pool)
