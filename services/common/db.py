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


class Listener:
    """LISTEN on channels over one dedicated connection, reconnecting on loss.

    ``callback(channel, payload)`` runs on the event loop for every
    notification. After a reconnect, ``on_reconnect()`` (if given) runs so the
    owner can re-read state it may have missed; the owner's polling fallback
    covers the gap meanwhile.
    """

    def __init__(
        self,
        url: str,
        channels: Iterable[str],
        callback: Callable[[str, str], None],
        *,
        on_reconnect: Callable[[], None] | None = None,
    ):
        self.url = url
        self.channels = list(channels)
        self.callback = callback
        self.on_reconnect = on_reconnect
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = asyncio.Event()
        self._closed = False

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._watch(), name="pg-listener")

    def _notify(self, _conn: object, _pid: int, channel: str, payload: object) -> None:
        # asyncpg passes the payload as a str (typed ``object`` in its stubs).
        self.callback(channel, str(payload))

    def _on_lost(self, _conn: object) -> None:
        self._lost.set()

    async def _connect(self) -> None:
        conn = await connect(self.url)
        conn.add_termination_listener(self._on_lost)
        for channel in self.channels:
            await conn.add_listener(channel, self._notify)
        self._conn = conn

    async def _watch(self) -> None:
        delay = 0.1
        while not self._closed:
            await self._lost.wait()
            if self._closed:
                return
            self._lost.clear()
            log.warning("LISTEN connection lost; reconnecting")
            while not self._closed:
                try:
                    await self._connect()
                    delay = 0.1
                    if self.on_reconnect:
                        self.on_reconnect()
                    break
                except (OSError, asyncpg.PostgresError) as exc:
                    log.warning("LISTEN reconnect failed: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    async def close(self) -> None:
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
