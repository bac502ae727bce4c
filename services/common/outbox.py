"""Durable lifecycle events: a transactional outbox per service schema.

Each service that emits lifecycle events (DESIGN.md section 6) owns a table
``<schema>.outbox`` (created by its migrations, see :data:`OUTBOX_DDL`) and
writes events with :meth:`Outbox.emit` inside the transaction of the state
change they describe.

Positions (``pos``, the ids handed to readers) are assigned by the insert
itself, with no second write per row: ``pos = xid << 20 | n``, where ``xid``
is the writing transaction's id (``pg_current_xact_id()``) and ``n`` counts
the transaction's events from 1. A reader only reads rows whose transaction
is older than its snapshot's ``xmin`` (``pg_snapshot_xmin(
pg_current_snapshot())``): every such transaction has ended, so no row can
later appear below a position a reader has passed, and a reader that
resumes after the last ``pos`` it saw misses nothing and sees nothing twice.
(A plain ``bigserial`` cursor would skip a row that commits after a row
with a larger id.) Positions grow with transaction ids, not by one; a
transaction may emit at most :data:`MAX_EVENTS_PER_TRANSACTION` events.

The price is that a write transaction still open anywhere on the database
server (``xmin`` is cluster-wide) holds back delivery of newer events until
it ends. runyard's own transactions last milliseconds; a long-running
writer on the same server delays ``WatchEvents`` by as long as it runs.

The writing transaction also sends ``NOTIFY <channel>`` (delivered on
commit) with its transaction id, so readers wake at once and know whether
the horizon has passed the new events yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

import asyncpg
from runyard._proto.v1 import common_pb2

__all__ = ["HORIZON_SQL", "MAX_EVENTS_PER_TRANSACTION", "OUTBOX_DDL", "Outbox", "OutboxTrimmer", "xid_of"]

log = logging.getLogger(__name__)

#: Bits of ``pos`` that number the events of one transaction.
_TX_BITS = 20
#: Most events one transaction can emit.
MAX_EVENTS_PER_TRANSACTION = (1 << _TX_BITS) - 1

#: SQL expression: the smallest ``pos`` a transaction still running (or yet
#: to start) can write; every row below it is final.
HORIZON_SQL = f"(pg_snapshot_xmin(pg_current_snapshot())::text::bigint << {_TX_BITS})"

#: DDL of an outbox table; ``{schema}`` is the owning service's schema.
OUTBOX_DDL = """
CREATE TABLE {schema}.outbox (
    id         bigserial PRIMARY KEY,
    pos        bigint NOT NULL UNIQUE,
    type       text NOT NULL,
    org_id     text NOT NULL,
    session_id uuid,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


def xid_of(pos: int) -> int:
    """The transaction id that wrote the event at ``pos``."""
    return pos >> _TX_BITS


class Outbox:
    """The outbox of one schema.

    Args:
        schema: owning schema (``"sessions"``, ``"router"``, ``"gateway"``).
        channel: NOTIFY channel announcing new events (payload: the writing
            transaction's id).
    """

    def __init__(self, schema: str, channel: str):
        self.schema = schema
        self.channel = channel
        self._emit_sql = f"""
            WITH x AS (SELECT pg_current_xact_id()::text::bigint AS xid),
                 b AS (SELECT coalesce(
                           (SELECT max(o.pos) FROM {schema}.outbox o, x
                            WHERE o.pos > x.xid << {_TX_BITS} AND o.pos < (x.xid + 1) << {_TX_BITS}),
                           (SELECT x.xid << {_TX_BITS} FROM x)) AS base),
                 ins AS (
                    INSERT INTO {schema}.outbox (pos, type, org_id, session_id, data)
                    SELECT b.base + u.n, u.type, u.org_id, u.session_id, u.data
                    FROM b, unnest($1::text[], $2::text[], $3::uuid[], $4::bytea[])
                         WITH ORDINALITY AS u(type, org_id, session_id, data, n)
                    RETURNING pos)
            SELECT pg_notify('{channel}', (SELECT xid FROM x)::text), (SELECT array_agg(pos ORDER BY pos) FROM ins)
        """

    def emit_args(self, events: Sequence[common_pb2.LifecycleEvent]) -> tuple[list, list, list, list]:
        """The four array arguments of an outbox insert for ``events``
        (types, org ids, session ids, serialized events), for callers that
        fold the insert into a statement of their own (see
        :meth:`insert_sql`)."""
        if len(events) > MAX_EVENTS_PER_TRANSACTION:
            raise ValueError(f"at most {MAX_EVENTS_PER_TRANSACTION} events per transaction")
        return (
            [e.type for e in events],
            [e.org_id for e in events],
            [uuid.UUID(e.session_id) if e.session_id else None for e in events],
            [e.SerializeToString() for e in events],
        )

    def insert_sql(self, first_param: int) -> str:
        """A data-modifying CTE body that inserts the events passed as
        parameters ``$first_param .. $first_param+3`` (see :meth:`emit_args`)
        and notifies readers; use it as ``WITH ..., ev AS (<this>)`` inside a
        larger statement. Only one per statement: two in one statement would
        number their events from the same base."""
        p = first_param
        return f"""
            INSERT INTO {self.schema}.outbox (pos, type, org_id, session_id, data)
            SELECT (x.xid << {_TX_BITS}) + coalesce(
                       (SELECT max(o.pos) FROM {self.schema}.outbox o
                        WHERE o.pos > x.xid << {_TX_BITS} AND o.pos < (x.xid + 1) << {_TX_BITS}) - (x.xid << {_TX_BITS}),
                       0) + u.n,
                   u.type, u.org_id, u.session_id, u.data
            FROM (SELECT pg_current_xact_id()::text::bigint AS xid, pg_notify('{self.channel}',
                         pg_current_xact_id()::text) AS notified) x,
                 unnest(${p}::text[], ${p + 1}::text[], ${p + 2}::uuid[], ${p + 3}::bytea[])
                     WITH ORDINALITY AS u(type, org_id, session_id, data, n)
            WHERE cardinality(${p}::text[]) > 0
            RETURNING pos
        """

    async def emit(self, conn: asyncpg.Connection, events: Sequence[common_pb2.LifecycleEvent]) -> list[int]:
        """Insert ``events`` in the caller's transaction (one statement);
        returns their positions. Readers are notified when it commits."""
        if not events:
            return []
        positions = await conn.fetchval(self._emit_sql, *self.emit_args(events), column=1)
        return list(positions or [])

    async def trim(self, pool: asyncpg.Pool, retention_s: float, batch: int = 1000) -> int:
        """Delete events older than ``retention_s`` seconds, in batches, never
        the newest one. Returns how many were deleted."""
        total = 0
        while True:
            status = await pool.execute(
                f"""
                DELETE FROM {self.schema}.outbox WHERE id IN (
                    SELECT id FROM {self.schema}.outbox
                    WHERE created_at < now() - make_interval(secs => $1)
                      AND pos < (SELECT max(pos) FROM {self.schema}.outbox)
                    LIMIT {int(batch)})
                """,
                retention_s,
            )
            done = int(status.split()[-1])
            total += done
            if done < batch:
                return total

    async def read(
        self, pool: asyncpg.Pool | asyncpg.Connection, after_pos: int, limit: int, types: Sequence[str] = ()
    ) -> list[common_pb2.LifecycleEvent]:
        """Final events with ``pos > after_pos``, oldest first, ``id`` = ``pos``.

        Events of transactions that may still be running are left for a
        later read (see the module docstring)."""
        rows = await pool.fetch(
            f"""
            SELECT pos, data FROM {self.schema}.outbox
            WHERE pos > $1 AND pos < {HORIZON_SQL}
              AND (cardinality($3::text[]) = 0 OR type = ANY($3::text[]))
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


class OutboxTrimmer:
    """Background task: deletes events older than ``retention_s`` every
    ``interval_s`` (see :meth:`Outbox.trim`); database errors are logged and
    retried at the next interval."""

    def __init__(self, outbox: Outbox, pool: asyncpg.Pool, *, retention_s: float, interval_s: float = 3600.0):
        self.outbox = outbox
        self.pool = pool
        self.retention_s = retention_s
        self.interval_s = interval_s

    async def run(self) -> None:
        if self.retention_s <= 0:
            return
        next_trim = time.monotonic() + min(60.0, self.interval_s)
        while True:
            await asyncio.sleep(max(next_trim - time.monotonic(), 0.0))
            next_trim = time.monotonic() + self.interval_s
            try:
                trimmed = await self.outbox.trim(self.pool, self.retention_s)
                if trimmed:
                    log.info("trimmed %d events from %s.outbox", trimmed, self.outbox.schema)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("trimming %s.outbox failed: %s", self.outbox.schema, exc)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """Cancel the task running :meth:`run` and wait for it."""
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
