"""Helpers shared by test modules (one copy each): the repository root,
run events and router responses, database counts, a pool's bounded close,
a gRPC servicer of a test's own on a free port.

:mod:`tests.support.router` holds the router tests' harness and fixtures;
:mod:`tests.support.worker` runs a real RunExecutor against a router of a
test's own;
:mod:`tests.stack` (the service processes) and :mod:`tests.fakes` (fake
providers) stay where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc

from runyard._proto.v1 import common_pb2

__all__ = [
    "ROOT",
    "assert_gap_free",
    "close_pool",
    "collect",
    "count",
    "kinds",
    "run_payload",
    "serving",
    "text_of",
]

T = TypeVar("T")

#: The repository's root directory.
ROOT = Path(__file__).parents[2]

#: How long a fixture's pool close may wait for connections a failed test still holds.
POOL_CLOSE_TIMEOUT_S = 10.0


async def close_pool(pool: asyncpg.Pool) -> None:
    """Close ``pool`` at a fixture's teardown; terminate it if a connection
    is still held after :data:`POOL_CLOSE_TIMEOUT_S`.

    pytest-timeout stops timing a test once it has failed (its
    ``pytest_exception_interact`` hook cancels the timer), so a close that
    waits for a connection the failed test never released would otherwise
    hold up the whole run for good.
    """
    try:
        async with asyncio.timeout(POOL_CLOSE_TIMEOUT_S):
            await pool.close()
    except TimeoutError:
        pool.terminate()


@contextlib.asynccontextmanager
async def serving(add: Callable[[Any, grpc.aio.Server], None], servicer: Any) -> AsyncIterator[str]:
    """``servicer`` on a grpc.aio server of its own (``add`` is the generated
    ``add_<Service>Servicer_to_server``), on a free loopback port: yields its
    address; the server stops on exit, even when the test fails."""
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def run_payload() -> common_pb2.RunPayload:
    """A new run's payload ("hello", agent ``default``, org ``org``), for a
    session of its own: for the gateway's store without the services."""
    return common_pb2.RunPayload(
        run_id=str(uuid.uuid4()),
        org_id="org",
        session_id=str(uuid.uuid4()),
        session_key=f"s-{uuid.uuid4()}",
        agent_id="default",
        input=common_pb2.RunInput(text="hello"),
    )


async def collect(stream: AsyncIterable[T]) -> list[T]:
    """Everything ``stream`` yields (run events, router responses...)."""
    return [item async for item in stream]


def kinds(events: Sequence[Any]) -> list[str]:
    """The name of each event's ``event`` oneof (``RunEvent`` or ``GenerateResponse``)."""
    return [e.WhichOneof("event") for e in events]


def text_of(events: Sequence[Any]) -> str:
    """The text of every ``text_delta``, joined."""
    return "".join(e.text_delta.text for e in events if e.HasField("text_delta"))


def assert_gap_free(events: Sequence[Any], start: int = 1) -> None:
    """The events' ``seq`` run ``start, start + 1, ...`` with no gap and no repeat."""
    assert [e.seq for e in events] == list(range(start, start + len(events)))


async def count(url: str, sql: str) -> int:
    """``sql`` (a count) on the database at ``url``."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()
