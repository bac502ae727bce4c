"""tests/unit holds tests that need neither PostgreSQL nor service processes:
they run anywhere in seconds (``pytest tests/unit``). A test here that asks
for the database fails with a pointer to where it belongs."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def pg_url() -> str:
    """Refuses: every database fixture (database_url, migrated_url, stacks) starts here."""
    pytest.fail(
        "tests/unit is for tests without PostgreSQL; a test that needs the database goes in tests/db "
        "(or tests/integration when it starts service processes)",
        pytrace=False,
    )
