"""PostgreSQL access: pools, schema migrations and LISTEN/NOTIFY.

Each service owns one schema (``gateway``, ``sessions``, ``router``) and its
migrations live beside its code as ``migrations/NNNN_name.sql``. Migrations
run under a session-level advisory lock held on a dedicated connection (never
a pooled one: asyncpg's pool releases advisory locks when a connection goes
back to the pool), each file in its own transaction, recorded in
``<schema>.schema_migrations``.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from tenacity import AsyncRetrying, RetryCallState, wait_exponential

__all__ = [
    "Connection",
    "Executor",
    "Listener",
    "Row",
    "SCHEMAS",
    "connect",
    "create_pool",
    "migrate",
    "migrate_all",
    "pending_migrations",
    "returned",
]

log = logging.getLogger(__name__)

#: One connection: a dedicated one (:func:`connect`) or one acquired from a pool
#: (``async with pool.acquire()``; asyncpg types that one as a proxy, not a Connection).
Connection: TypeAlias = asyncpg.Connection | PoolConnectionProxy
#: Where a single statement can run: a connection, or the pool (which acquires one for it).
Executor: TypeAlias = Connection | asyncpg.Pool
#: A result row, or a mapping shaped like one (asyncpg's Record is not a Mapping).
Row: TypeAlias = asyncpg.Record | Mapping[str, Any]


def returned(row: asyncpg.Record | None) -> asyncpg.Record:
    """The row of a statement that always returns one (``INSERT ... RETURNING``,
    ``UPDATE ... RETURNING`` of a row held locked): asyncpg types every
    ``fetchrow`` as optional.

    Raises:
        RuntimeError: there was no row after all (a bug, not a user error).
    """
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


#: schema -> package holding its ``migrations`` directory, in dependency order.
SCHEMAS: dict[str, str] = {
    "sessions": "runyard.sessions",
    "gateway": "runyard.gateway",
    "router": "runyard.router",
}


async def connect(url: str, *, timeout_s: float = 10.0) -> asyncpg.Connection:
    """One connection to ``url`` (a libpq-style URL)."""
    return await asyncpg.connect(url, timeout=timeout_s)


async def _keep_session_state(_conn: asyncpg.Connection) -> None:
    """Pool release hook that skips asyncpg's reset query (see :func:`create_pool`)."""


async def create_pool(
    url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 10.0
) -> asyncpg.Pool:
    """A connection pool; statements are cached per connection.

    Released connections are not sent asyncpg's reset query (``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), which
    is a round trip and a transaction of its own on every release (about 6%
    of the gateway's and sessions' CPU per run). That is safe because no
    runyard code leaves session state on a pooled connection:

    * advisory locks on pooled connections are transaction-scoped
      (``pg_advisory_xact_lock``); the session-level lock of :func:`migrate`
      is taken on a dedicated connection;
    * ``LISTEN`` runs on the dedicated connection of :class:`Listener`;
    * nothing runs ``SET`` (only ``SET LOCAL`` would be allowed) or creates
      temporary tables, and cursors live inside transactions.

    asyncpg still rolls back a transaction left open and drops listener
    callbacks before calling this hook (``Connection._reset``), so a
    connection released mid-transaction (a cancelled caller) comes back
    clean.
    """
    pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        command_timeout=60,
        reset=_keep_session_state,
    )
    assert pool is not None
    return pool


def _migration_files(package: str) -> list[tuple[str, str]]:
    folder = resources.files(package).joinpath("migrations")
    files = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    )
    return [(name.removesuffix(".sql"), sql) for name, sql in files]


def _lock_key(schema: str) -> int:
    return zlib.crc32(f"runyard.migrate.{schema}".encode())


async def pending_migrations(conn: asyncpg.Connection, schema: str) -> list[str]:
    """Names of the migrations of ``schema`` not applied yet."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations")
    applied: set[str] = set()
    if exists:
        applied = {r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
    return [name for name, _ in _migration_files(SCHEMAS[schema]) if name not in applied]


async def migrate(url: str, schema: str, *, progress: Callable[[str], None] | None = None) -> list[str]:
    """Apply the pending migrations of ``schema``; returns the names applied.

    Safe to run concurrently from several processes (advisory lock).
    """
    conn = await connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _lock_key(schema))
        try:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {schema}.schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await conn.fetch(f"SELECT version FROM {schema}.schema_migrations")}
            applied: list[str] = []
            for name, sql in _migration_files(SCHEMAS[schema]):
                if name in done:
                    continue
                if progress:
                    progress(f"{schema}: applying {name}")
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(f"INSERT INTO {schema}.schema_migrations(version) VALUES ($1)", name)
                applied.append(name)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _lock_key(schema))
    finally:
        await conn.close()


async def migrate_all(
    url: str, schemas: Iterable[str] | None = None, *, progress: Callable[[str], None] | None = None
) -> dict[str, list[str]]:
    """Apply the migrations of every schema (default: all services)."""
    return {schema: await migrate(url, schema, progress=progress) for schema in (schemas or SCHEMAS)}


def _log_reconnect_failure(state: RetryCallState) -> None:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    log.warning("LISTEN reconnect failed (%s); retrying in %.1f s", error, delay)


class Listener:
    """LISTEN on channels over one dedicated connection, reconnecting on loss.

    Several owners in one process share one Listener: each calls
    :meth:`subscribe` before :meth:`start`. That matters to the server, not
    only to the connection count: PostgreSQL (15 here) signals every backend
    of a database that LISTENs on any channel for each NOTIFY sent in it,
    whatever the channel, about 14 us of server CPU per listening backend per
    NOTIFY (docs/benchmarks.md, "PostgreSQL's NOTIFY, measured alone").

    ``callback(channel, payload)`` runs on the event loop for every
    notification on a channel its owner subscribed to. After a reconnect,
    each owner's ``on_reconnect()`` (if given) runs so it can re-read state it
    may have missed; its polling fallback covers the gap meanwhile. Reconnects
    back off exponentially from 0.1 s to 5 s (tenacity) and never give up
    until :meth:`close`.

    Args:
        url: libpq-style URL of the database.
        channels: the first owner's channels (may be empty).
        callback: the first owner's callback (required with ``channels``).
        on_reconnect: the first owner's reconnect hook.

    Raises:
        ValueError: ``channels`` or ``on_reconnect`` without ``callback``.
    """

    def __init__(
        self,
        url: str,
        channels: Iterable[str] = (),
        callback: Callable[[str, str], None] | None = None,
        *,
        on_reconnect: Callable[[], None] | None = None,
    ):
        self.url = url
        self._callbacks: dict[str, list[Callable[[str, str], None]]] = {}
        self._on_reconnect: list[Callable[[], None]] = []
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closed = False
        channels = list(channels)
        if callback is not None:
            self.subscribe(channels, callback, on_reconnect=on_reconnect)
        elif channels or on_reconnect is not None:
            raise ValueError("a Listener's channels and on_reconnect need a callback")

    def subscribe(
        self,
        channels: Iterable[str],
        callback: Callable[[str, str], None],
        *,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        """Add an owner: ``callback`` gets the notifications of ``channels``
        (two owners may share a channel; each gets every notification).

        Raises:
            RuntimeError: the Listener has started (a LISTEN issued later
                could miss notifications its owner expects from the start).
        """
        if self._conn is not None or self._closed:
            raise RuntimeError("subscribe before Listener.start()")
        for channel in channels:
            self._callbacks.setdefault(channel, []).append(callback)
        if on_reconnect is not None:
            self._on_reconnect.append(on_reconnect)

    async def start(self) -> None:
        """Connect and LISTEN on every subscribed channel.

        Raises:
            OSError, asyncpg.PostgresError: the first connection failed (a
                service does not start without its notifications).
        """
        await self._connect()
        self._task = asyncio.create_task(self._watch(), name="pg-listener")

    def _notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        # asyncpg passes the payload as a str (typed ``object`` in its stubs).
        for callback in self._callbacks.get(channel, ()):
            callback(channel, str(payload))

    def _on_lost(self, _conn: object) -> None:
        self._lost.set()

    async def _connect(self) -> None:
        conn = await connect(self.url)
        try:
            conn.add_termination_listener(self._on_lost)
            for channel in self._callbacks:
                await conn.add_listener(channel, self._notify)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def _watch(self) -> None:
        while not self._closed:
            await self._lost.wait()
            if self._closed:
                return
            self._lost.clear()
            log.warning("LISTEN connection lost; reconnecting")
            if self._conn is not None and not self._conn.is_closed():
                self._conn.terminate()
            async for attempt in AsyncRetrying(
                wait=wait_exponential(multiplier=0.1, max=5.0),
                before_sleep=_log_reconnect_failure,
            ):
                with attempt:
                    await self._connect()
            for hook in self._on_reconnect:
                hook()

    async def close(self) -> None:
        """Stop reconnecting and close the connection."""
        self._closed = True
        self._lost.set()
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._conn and not self._conn.is_closed():
            await self._conn.close()
