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
from runyard.common import db

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
        relay_columns: the table also records, for events copied from
            another service's outbox, that source and the event's position
            there (``relayed_from``, ``relayed_pos``, unique together), and an
            event copied twice is stored once (the gateway's outbox).
    """

    def __init__(self, schema: str, channel: str, *, relay_columns: bool = False):
        self.schema = schema
        self.channel = channel
        self.relay_columns = relay_columns
        self._emit_sql = f"""
            WITH ins AS ({self.insert_sql(1)})
            SELECT array_agg(pos ORDER BY pos) FROM ins
        """

    def emit_args(
        self, events: Sequence[common_pb2.LifecycleEvent], relayed_from: Sequence[str] | None = None
    ) -> list[list[object]]:
        """The array arguments of an outbox insert for ``events`` (see
        :meth:`insert_sql`). With ``relayed_from`` (one source name per
        event, "" for the gateway's own), an event's ``id`` is its position
        in that source's outbox; it is not stored in the event itself."""
        if len(events) > MAX_EVENTS_PER_TRANSACTION:
            raise ValueError(f"at most {MAX_EVENTS_PER_TRANSACTION} events per transaction")
        data: list[object] = []
        for event in events:
            if event.id:
                copy = common_pb2.LifecycleEvent()
                copy.CopyFrom(event)
                copy.ClearField("id")
                data.append(copy.SerializeToString())
            else:
                data.append(event.SerializeToString())
        args: list[list[object]] = [
            [e.type for e in events],
            [e.org_id for e in events],
            [uuid.UUID(e.session_id) if e.session_id else None for e in events],
            data,
        ]
        if self.relay_columns:
            sources = list(relayed_from) if relayed_from is not None else [""] * len(events)
            args.append([source or None for source in sources])
            args.append([e.id if source else None for e, source in zip(events, sources, strict=True)])
        return args

    @property
    def arg_count(self) -> int:
        """How many parameters :meth:`insert_sql` takes."""
        return 6 if self.relay_columns else 4

    def insert_sql(self, first_param: int, *, when: str = "") -> str:
        """The body of a data-modifying CTE (``WITH ev AS (<this>)``) that
        inserts the events passed as parameters ``$first_param`` and on (see
        :meth:`emit_args`), numbers them and notifies readers on commit.
        ``when`` is an extra SQL condition (e.g. ``EXISTS (SELECT 1 FROM
        upd)``). At most one per statement: two in one statement would
        number their events from the same base."""
        p = first_param
        columns = "pos, type, org_id, session_id, data"
        values = "u.type, u.org_id, u.session_id, u.data"
        arrays = f"${p}::text[], ${p + 1}::text[], ${p + 2}::uuid[], ${p + 3}::bytea[]"
        names = "type, org_id, session_id, data"
        conflict = ""
        if self.relay_columns:
            columns += ", relayed_from, relayed_pos"
            values += ", u.relayed_from, u.relayed_pos"
            arrays += f", ${p + 4}::text[], ${p + 5}::bigint[]"
            names += ", relayed_from, relayed_pos"
            # Names the predicate of the partial unique index (gateway migration 0010).
            conflict = "ON CONFLICT (relayed_from, relayed_pos) WHERE relayed_from IS NOT NULL DO NOTHING"
        # The transaction's last position so far is read once per statement
        # (in ``x``, one row), not once per event: per event, the generic
        # plan's guess of 10 events made it cost five times the custom plan,
        # so PostgreSQL planned the hot path's statements anew on every
        # execution (about a tenth of PostgreSQL's CPU per run).
        lo = f"(t.xid << {_TX_BITS})"
        return f"""
            INSERT INTO {self.schema}.outbox ({columns})
            SELECT x.base + u.n, {values}
            FROM (SELECT coalesce(
                             (SELECT max(o.pos) FROM {self.schema}.outbox o
                              WHERE o.pos > {lo} AND o.pos < {lo} + {1 << _TX_BITS}),
                             {lo}) AS base,
                         pg_notify('{self.channel}', t.xid::text) AS notified
                  FROM (SELECT pg_current_xact_id()::text::bigint AS xid) t
                  OFFSET 0) x,
                 unnest({arrays}) WITH ORDINALITY AS u({names}, n)
            WHERE cardinality(${p}::text[]) > 0 {f"AND {when}" if when else ""}
            {conflict}
            RETURNING pos
        """

    async def emit(
        self,
        conn: db.Executor,
        events: Sequence[common_pb2.LifecycleEvent],
        relayed_from: Sequence[str] | None = None,
    ) -> list[int]:
        """Insert ``events`` in the caller's transaction (one statement; on
        the pool, a transaction of its own);
        returns their positions (an event stored before, for a relaying
        outbox, gets none). Readers are notified when it commits."""
        if not events:
            return []
        positions = await conn.fetchval(self._emit_sql, *self.emit_args(events, relayed_from))
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

    async def wait_final(self, pool: db.Executor, timeout_s: float = 10.0) -> bool:
        """Wait until every event committed so far is below the readers'
        horizon (no older writer is still open anywhere on the server);
        True if that happened within ``timeout_s``. For tests and tools that
        must see everything committed before they read."""
        deadline = time.monotonic() + timeout_s
        while True:
            lagging = await pool.fetchval(
                f"SELECT coalesce(max(pos), 0) >= {HORIZON_SQL} FROM {self.schema}.outbox"
            )
            if not lagging:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def read(
        self, pool: db.Executor, after_pos: int, limit: int, types: Sequence[str] = ()
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
