"""Durable lifecycle events: a transactional outbox per service schema.

Each service that emits lifecycle events (DESIGN.md section 6) owns a table
``<schema>.outbox`` (created by its migrations, see :data:`OUTBOX_DDL`) and
writes events with :meth:`Outbox.emit` inside the transaction of the state
change they describe.

Ids handed to readers (``pos``) are assigned in *commit order* by
:meth:`Outbox.sequence`: a transaction-scoped advisory lock serializes
sequencers across replicas, and a row only becomes visible (and so gets a
``pos``) once its transaction committed. A reader that resumes after ``pos``
therefore never misses an event that committed later with a smaller ``id``,
which a plain ``bigserial`` cursor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import zlib
from collections.abc import Callable, Sequence

import asyncpg
from runyard._proto.v1 import common_pb2

__all__ = ["OUTBOX_DDL", "Outbox", "Sequencer"]

log = logging.getLogger(__name__)

#: DDL of an outbox table; ``{schema}`` is the owning service's schema.
OUTBOX_DDL = """
CREATE TABLE {schema}.outbox (
    id         bigserial PRIMARY KEY,
    pos        bigint UNIQUE,
    type       text NOT NULL,
    org_id     text NOT NULL,
    session_id uuid,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_unsequenced ON {schema}.outbox (id) WHERE pos IS NULL;
"""


class Outbox:
    """The outbox of one schema.

    Args:
        schema: owning schema (``"sessions"``, ``"router"``, ``"gateway"``).
        channel: NOTIFY channel announcing newly sequenced events.
    """

    def __init__(self, schema: str, channel: str):
        self.schema = schema
        self.channel = channel
        self._lock_key = zlib.crc32(f"runyard.{schema}.outbox.sequencer".encode())
        #: Called after a transaction wrote events (wakes a sequencer task).
        self.on_written: Callable[[], None] | None = None

    async def emit(self, conn: asyncpg.Connection, events: Sequence[common_pb2.LifecycleEvent]) -> None:
        """Insert ``events`` in the caller's transaction (one statement)."""
        if not events:
            return
        await conn.execute(
            f"""
            INSERT INTO {self.schema}.outbox (type, org_id, session_id, data)
            SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::bytea[])
            """,
            [e.type for e in events],
            [e.org_id for e in events],
            [uuid.UUID(e.session_id) if e.session_id else None for e in events],
            [e.SerializeToString() for e in events],
        )

    def written(self) -> None:
        """Tell the sequencer that committed events are waiting."""
        if self.on_written is not None:
            self.on_written()

    async def sequence(self, pool: asyncpg.Pool) -> int:
        """Give unsequenced rows their ``pos`` in commit order; returns how many."""
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            status = await conn.execute(
                f"""
                WITH base AS (SELECT coalesce(max(pos), 0) AS m FROM {self.schema}.outbox),
                     todo AS (SELECT id, row_number() OVER (ORDER BY id) AS rn
                              FROM {self.schema}.outbox WHERE pos IS NULL)
                UPDATE {self.schema}.outbox o SET pos = base.m + todo.rn
                FROM todo, base WHERE o.id = todo.id
                """
            )
            count = int(status.split()[-1])
            if count:
                await conn.execute("SELECT pg_notify($1, '')", self.channel)
            return count

    async def trim(self, pool: asyncpg.Pool, retention_s: float, batch: int = 1000) -> int:
        """Delete sequenced events older than ``retention_s`` seconds, in
        batches, never the newest one (its ``pos`` is where the next starts).
        Returns how many were deleted."""
        total = 0
        while True:
            status = await pool.execute(
                f"""
                DELETE FROM {self.schema}.outbox WHERE id IN (
                    SELECT id FROM {self.schema}.outbox
                    WHERE created_at < now() - make_interval(secs => $1)
                      AND pos IS NOT NULL AND pos < (SELECT max(pos) FROM {self.schema}.outbox)
                    LIMIT {int(batch)})
                """,
                retention_s,
            )
            done = int(status.split()[-1])
            total += done
            if done < batch:
                return total

    async def read(
        self, pool: asyncpg.Pool, after_pos: int, limit: int, types: Sequence[str] = ()
    ) -> list[common_pb2.LifecycleEvent]:
        """Sequenced events with ``pos > after_pos``, oldest first, ``id`` = ``pos``."""
        await self.sequence(pool)
        rows = await pool.fetch(
            f"""
            SELECT pos, data FROM {self.schema}.outbox
            WHERE pos > $1 AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))
            ORDER BY pos LIMIT $2
            """,
            after_pos,
            limit,
            list(types),
        )
        events = []
        for row in rows:
            event = common_pb2.LifecycleEvent.FromString(row["data"])
            event.id = row["pos"]
            events.append(event)
        return events


class Sequencer:
    """Background task: sequences an outbox soon after events are written
    (woken by :meth:`Outbox.written`), and every ``interval_s`` regardless.

    With ``retention_s`` it also trims events older than that every
    ``trim_interval_s`` (see :meth:`Outbox.trim`).
    """

    def __init__(
        self,
        outbox: Outbox,
        pool: asyncpg.Pool,
        interval_s: float = 0.5,
        *,
        retention_s: float = 0.0,
        trim_interval_s: float = 3600.0,
    ):
        self.outbox = outbox
        self.pool = pool
        self.interval_s = interval_s
        self.retention_s = retention_s
        self.trim_interval_s = trim_interval_s
        self._wake = asyncio.Event()
        outbox.on_written = self._wake.set

    async def run(self) -> None:
        next_trim = time.monotonic() + min(60.0, self.trim_interval_s)
        while True:
            if self.retention_s and time.monotonic() >= next_trim:
                next_trim = time.monotonic() + self.trim_interval_s
                try:
                    trimmed = await self.outbox.trim(self.pool, self.retention_s)
                    if trimmed:
                        log.info("trimmed %d events from %s.outbox", trimmed, self.outbox.schema)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("trimming %s.outbox failed: %s", self.outbox.schema, exc)
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
            # cancel that arrives as the wake-up fires, and the task never stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.outbox.sequence(self.pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("sequencing %s.outbox failed: %s", self.outbox.schema, exc)
            except Exception:
                # Readers of a gateway outbox only see sequenced events: this
                # loop must outlive a bug, not stop serving them for good.
                log.exception("sequencing %s.outbox failed", self.outbox.schema)
