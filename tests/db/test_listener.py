"""runyard.common.db.Listener against real PostgreSQL: owners sharing one
LISTEN connection each get their channels' notifications, and a lost
connection comes back by itself and tells every owner."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from runyard.common.db import Listener

pytestmark = pytest.mark.timeout(60)


class Owner:
    """What one owner of the Listener saw."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.reconnects = 0
        self.back = asyncio.Event()

    def callback(self, channel: str, payload: str) -> None:
        self.received.put_nowait((channel, payload))

    def reconnected(self) -> None:
        self.reconnects += 1
        self.back.set()

    async def next(self) -> tuple[str, str]:
        return await asyncio.wait_for(self.received.get(), 10)


async def listening_backends(conn: asyncpg.Connection) -> int:
    """Backends of this database other than ``conn`` whose last statement was a LISTEN."""
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND query LIKE 'LISTEN %'"
        )
    )


async def test_two_owners_share_one_connection_and_each_gets_its_channels(database_url: str) -> None:
    first, second = Owner(), Owner()
    listener = Listener(database_url, ["chan_a", "chan_both"], first.callback)
    listener.subscribe(["chan_b", "chan_both"], second.callback)
    notifier = await asyncpg.connect(database_url)
    try:
        await listener.start()
        assert await listening_backends(notifier) == 1
        await notifier.execute("SELECT pg_notify('chan_a', 'one'), pg_notify('chan_b', 'two')")
        await notifier.execute("SELECT pg_notify('chan_both', 'three')")
        assert [await first.next(), await first.next()] == [("chan_a", "one"), ("chan_both", "three")]
        assert [await second.next(), await second.next()] == [("chan_b", "two"), ("chan_both", "three")]
        with pytest.raises(RuntimeError, match="before Listener.start"):
            listener.subscribe(["chan_c"], first.callback)
    finally:
        await listener.close()
        await notifier.close()
    assert first.received.empty() and second.received.empty()


async def test_a_terminated_connection_comes_back_and_every_owner_is_told(database_url: str) -> None:
    first, second = Owner(), Owner()
    listener = Listener(database_url, ["chan_a"], first.callback, on_reconnect=first.reconnected)
    listener.subscribe(["chan_b"], second.callback, on_reconnect=second.reconnected)
    notifier = await asyncpg.connect(database_url)
    try:
        await listener.start()
        terminated = await notifier.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert terminated == 1
        await asyncio.wait_for(first.back.wait(), 10)  # runs once the new connection LISTENs
        assert (first.reconnects, second.reconnects) == (1, 1)
        assert await listening_backends(notifier) == 1
        await notifier.execute("SELECT pg_notify('chan_a', 'after'), pg_notify('chan_b', 'after')")
        assert await first.next() == ("chan_a", "after")
        assert await second.next() == ("chan_b", "after")
    finally:
        await listener.close()
        await notifier.close()


def test_channels_without_a_callback_are_refused() -> None:
    with pytest.raises(ValueError, match="need a callback"):
        Listener("postgresql://unused", ["chan_a"])
