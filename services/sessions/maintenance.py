"""Session maintenance: prune, cap, trim old transcripts and old events.

One pass (:meth:`Maintenance.run`) does, in order:

1. **prune**: delete sessions with no run for ``maintenance.prune_after_s``
   (their transcripts go with them). An activation still open ends with
   session.end DELETED in the same transaction.
2. **cap**: per (org, agent), keep the ``max_sessions_per_agent`` most
   recently active sessions and delete the others, least recently active
   first, never one with an open activation. The sessions service cannot see
   the gateway's runs; a run always touches its session (resolve when queued,
   transcript read when started, commit when done), and an activation
   stays open until ``sessions.idle_timeout_s`` after the last touch, so "no
   open activation" means "no run within the idle timeout".
3. **old transcripts**: a conversation that was compacted lives on in a
   chain of sessions (each compaction starts a new one holding the summary);
   the transcripts of the ``keep_snapshots`` newest sessions of a chain are
   kept (the current one always), the turns of older ones are archived or
   dropped (``old_snapshots``). Transcripts are stored as appended turns, so
   there are no superseded copies within a session and nothing pending
   (``pending_snapshot_ttl_s`` no longer has anything to do).
4. **events**: delete outbox events and ended activations older than
   ``event_retention_s`` (never the newest event).

Every step works in batches of ``batch_size`` rows (one statement each) and
the dry run streams its candidates through a server-side cursor, so memory
stays flat however many sessions are stored. ``dry_run`` changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common import db, metrics
from runyard.common.config import MaintenanceConfig
from runyard.common.protoutil import timestamp
from runyard.sessions.store import SessionStore, _end_event

__all__ = ["Maintenance", "PruneBatch"]

log = logging.getLogger(__name__)

_REASONS = {"IDLE": sessions_pb2.PRUNE_REASON_IDLE, "CAP": sessions_pb2.PRUNE_REASON_CAP}

#: Sessions idle past the cutoff ($1 seconds), oldest first, in org $2 ('' = all).
_IDLE_WHERE = "s.last_active_at < now() - make_interval(secs => $1) AND ($2 = '' OR s.org_id = $2)"

#: Sessions of (org, agent) beyond the $3 most recent, excluding those the
#: idle prune takes ($1 > 0) and those with an open activation.
_CAP_CANDIDATES = """
WITH ranked AS (
    SELECT s.id, row_number() OVER (
        PARTITION BY s.org_id, s.agent_id ORDER BY s.last_active_at DESC, s.id DESC) AS rn
    FROM sessions.sessions s
    WHERE ($2 = '' OR s.org_id = $2)
      AND NOT ($1 > 0 AND s.last_active_at < now() - make_interval(secs => $1))
)
SELECT s.id, s.org_id, s.key, s.agent_id, s.last_active_at, s.message_count
FROM ranked r JOIN sessions.sessions s ON s.id = r.id
WHERE r.rn > $3
  AND NOT EXISTS (SELECT 1 FROM sessions.activations a WHERE a.session_id = s.id AND a.ended_at IS NULL)
ORDER BY s.last_active_at, s.id
"""

#: Current turns of sessions that are {keep} or more compactions behind their
#: conversation's current session, in org $2 ('' = all).
_OLD_TURNS = """
WITH RECURSIVE back(id, depth) AS (
    SELECT s.id, 0 FROM sessions.sessions s
    WHERE s.end_reason IS DISTINCT FROM 'COMPACTION' AND ($2 = '' OR s.org_id = $2)
      AND EXISTS (SELECT 1 FROM sessions.sessions p
                  WHERE p.next_session_id = s.id AND p.end_reason = 'COMPACTION')
    UNION ALL
    SELECT p.id, b.depth + 1 FROM back b
    JOIN sessions.sessions p ON p.next_session_id = b.id AND p.end_reason = 'COMPACTION'
    WHERE b.depth < 1000
)
SELECT t.session_id, t.turn FROM back JOIN sessions.turns t ON t.session_id = back.id
WHERE back.depth >= {keep} AND t.state = 'current'
"""

#: Dry run: the turn count the real pass would report. The sessions the
#: prune ($1) and the cap ($3) remove take their turns with them, so those
#: are not counted; $4 = keep_snapshots.
_DRY_RUN_TURNS = f"""
WITH gone AS MATERIALIZED (
    SELECT s.id FROM sessions.sessions s WHERE $1 > 0 AND {_IDLE_WHERE}
    UNION ALL
    SELECT c.id FROM ({_CAP_CANDIDATES}) c WHERE $3 > 0
)
SELECT count(*) FROM ({_OLD_TURNS.format(keep="$4")}) x
WHERE NOT EXISTS (SELECT 1 FROM gone g WHERE g.id = x.session_id)
"""


@dataclass(slots=True)
class PruneBatch:
    """One step of a pass: the sessions removed (or that would be) since the
    previous batch, and the running totals."""

    sessions: list[sessions_pb2.PrunedSession] = field(default_factory=list)
    stats: sessions_pb2.PruneStats = field(default_factory=sessions_pb2.PruneStats)
    done: bool = False


def _pruned(row: asyncpg.Record, reason: str) -> sessions_pb2.PrunedSession:
    return sessions_pb2.PrunedSession(
        session_id=str(row["id"]),
        org_id=row["org_id"],
        key=row["key"],
        agent_id=row["agent_id"],
        reason=_REASONS[reason],
        last_active_time=timestamp(row["last_active_at"]),
        message_count=row["message_count"],
    )


def _count(status: str) -> int:
    return int(status.split()[-1])


class Maintenance:
    """Maintenance passes over the sessions schema.

    Args:
        store: the sessions store (its pool, outbox and listeners are used).
        config: the ``maintenance`` section.
    """

    def __init__(self, store: SessionStore, config: MaintenanceConfig):
        self.store = store
        self.config = config

    @property
    def pool(self) -> asyncpg.Pool:
        return self.store.pool

    async def claim_schedule(self) -> bool:
        """True if this instance should run the scheduled pass now (at most
        one instance wins per ``interval_s``)."""
        won = await self.pool.fetchval(
            """
            UPDATE sessions.schedule SET last_run_at = now()
            WHERE job = 'maintenance' AND last_run_at < now() - make_interval(secs => $1)
            RETURNING true
            """,
            self.config.interval_s,
        )
        return bool(won)

    async def run(self, *, dry_run: bool = False, org_id: str = "") -> AsyncIterator[PruneBatch]:
        """One pass; yields a batch per step of progress, the last with ``done``.

        Args:
            dry_run: report what would go; change nothing.
            org_id: only this org's sessions and snapshots ("" = all, which
                also trims old outbox events and activations).
        """
        stats = sessions_pb2.PruneStats()
        cfg = self.config
        if cfg.prune_after_s > 0:
            async for batch in self._prune_idle(stats, dry_run, org_id):
                yield batch
        if cfg.max_sessions_per_agent > 0:
            async for batch in self._cap(stats, dry_run, org_id):
                yield batch
        await self._snapshots(stats, dry_run, org_id)
        yield PruneBatch(stats=sessions_pb2.PruneStats(**_stats_dict(stats)))
        if not org_id and cfg.event_retention_s > 0:
            await self._events(stats, dry_run)
        if not dry_run:
            for action, value in _stats_dict(stats).items():
                if value:
                    metrics.MAINTENANCE_ITEMS_TOTAL.labels(action).inc(value)
        log.info(
            "maintenance%s: %d idle and %d capped session(s), %d old transcript turn(s) archived, "
            "%d dropped, %d event(s) trimmed",
            " (dry run)" if dry_run else "",
            stats.sessions_idle,
            stats.sessions_capped,
            stats.snapshots_archived,
            stats.snapshots_dropped,
            stats.events_trimmed,
        )
        yield PruneBatch(stats=stats, done=True)

    # ------------------------------------------------------------ steps

    async def _stream(self, sql: str, *args: object) -> AsyncIterator[list[asyncpg.Record]]:
        """Rows of a read-only query in batches, through a server-side cursor."""
        size = self.config.batch_size
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            batch: list[asyncpg.Record] = []
            async for row in conn.cursor(sql, *args, prefetch=size):
                batch.append(row)
                if len(batch) >= size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    async def _delete_sessions(
        self, conn: db.Connection, ids: list[object], reason: str
    ) -> tuple[list[asyncpg.Record], list[common_pb2.LifecycleEvent]]:
        """Delete locked sessions; open activations end (session.end DELETED)
        in the same transaction. For the cap, a session that gained an open
        activation since it was chosen is kept."""
        guard = (
            "AND NOT EXISTS (SELECT 1 FROM sessions.activations a "
            "WHERE a.session_id = s.id AND a.ended_at IS NULL)"
            if reason == "CAP"
            else ""
        )
        gone = await conn.fetch(
            f"""
            DELETE FROM sessions.sessions s WHERE s.id = ANY($1::uuid[]) {guard}
            RETURNING s.id, s.org_id, s.key, s.agent_id, s.last_active_at, s.message_count
            """,
            ids,
        )
        events: list[common_pb2.LifecycleEvent] = []
        if reason == "IDLE" and gone:
            ended = await conn.fetch(
                """
                UPDATE sessions.activations a SET ended_at = now(), end_reason = 'DELETED'
                WHERE a.session_id = ANY($1::uuid[]) AND a.ended_at IS NULL
                RETURNING a.session_id, a.started_at, a.ended_at
                """,
                [r["id"] for r in gone],
            )
            by_id = {r["id"]: r for r in gone}
            events = [
                _end_event(
                    {
                        **dict(by_id[e["session_id"]]),
                        "started_at": e["started_at"],
                        "ended_at": e["ended_at"],
                    },
                    "DELETED",
                    source=self.store.instance_id,
                )
                for e in ended
            ]
            await self.store.outbox.emit(conn, events)
        return list(gone), events

    async def _delete_loop(
        self, select_sql: str, args: tuple[object, ...], reason: str, stats: sessions_pb2.PruneStats
    ) -> AsyncIterator[PruneBatch]:
        """Lock a batch of candidates (SKIP LOCKED: a session being resolved
        right now is left alone), delete it, repeat."""
        size = self.config.batch_size
        while True:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(f"{select_sql} LIMIT {size} FOR UPDATE OF s SKIP LOCKED", *args)
                gone, events = (
                    await self._delete_sessions(conn, [r["id"] for r in rows], reason) if rows else ([], [])
                )
            if events:
                metrics.SESSION_ENDS_TOTAL.labels("DELETED").inc(len(events))
                self.store._written(events)
            if reason == "IDLE":
                stats.sessions_idle += len(gone)
            else:
                stats.sessions_capped += len(gone)
            if gone:
                yield PruneBatch(
                    [_pruned(r, reason) for r in gone], sessions_pb2.PruneStats(**_stats_dict(stats))
                )
            if len(rows) < size or not gone:
                return  # no more candidates, or every one became active meanwhile

    async def _prune_idle(
        self, stats: sessions_pb2.PruneStats, dry_run: bool, org_id: str
    ) -> AsyncIterator[PruneBatch]:
        args = (self.config.prune_after_s, org_id)
        if dry_run:
            sql = (
                "SELECT id, org_id, key, agent_id, last_active_at, message_count FROM sessions.sessions s "
                f"WHERE {_IDLE_WHERE} ORDER BY last_active_at, id"
            )
            async for rows in self._stream(sql, *args):
                stats.sessions_idle += len(rows)
                yield PruneBatch(
                    [_pruned(r, "IDLE") for r in rows], sessions_pb2.PruneStats(**_stats_dict(stats))
                )
            return
        select = f"SELECT s.id FROM sessions.sessions s WHERE {_IDLE_WHERE} ORDER BY s.last_active_at, s.id"
        async for batch in self._delete_loop(select, args, "IDLE", stats):
            yield batch

    async def _cap(
        self, stats: sessions_pb2.PruneStats, dry_run: bool, org_id: str
    ) -> AsyncIterator[PruneBatch]:
        args = (self.config.prune_after_s, org_id, self.config.max_sessions_per_agent)
        if dry_run:
            async for rows in self._stream(_CAP_CANDIDATES, *args):
                stats.sessions_capped += len(rows)
                yield PruneBatch(
                    [_pruned(r, "CAP") for r in rows], sessions_pb2.PruneStats(**_stats_dict(stats))
                )
            return
        async for batch in self._delete_loop(_CAP_CANDIDATES, args, "CAP", stats):
            yield batch

    async def _snapshots(self, stats: sessions_pb2.PruneStats, dry_run: bool, org_id: str) -> None:
        """Archive or drop the turns of sessions ``keep_snapshots`` or more
        compactions old (counted in ``snapshots_archived`` / ``snapshots_dropped``)."""
        cfg = self.config
        size = cfg.batch_size
        archive = cfg.old_snapshots == "archive"
        if dry_run:
            extra = await self.pool.fetchval(
                _DRY_RUN_TURNS, cfg.prune_after_s, org_id, cfg.max_sessions_per_agent, cfg.keep_snapshots
            )
        else:
            extra = 0
            change = (
                "UPDATE sessions.turns SET state = 'archived' WHERE (session_id, turn) IN"
                if archive
                else "DELETE FROM sessions.turns WHERE (session_id, turn) IN"
            )
            while True:
                done = _count(
                    await self.pool.execute(
                        f"{change} (SELECT * FROM ({_OLD_TURNS.format(keep='$1')}) x LIMIT {size})",
                        cfg.keep_snapshots,
                        org_id,
                    )
                )
                extra += done
                if done < size:
                    break
        if archive:
            stats.snapshots_archived += int(extra)
        else:
            stats.snapshots_dropped += int(extra)

    async def _events(self, stats: sessions_pb2.PruneStats, dry_run: bool) -> None:
        retention = self.config.event_retention_s
        size = self.config.batch_size
        old_events = (
            "SELECT id FROM sessions.outbox WHERE created_at < now() - make_interval(secs => $1) "
            "AND pos < (SELECT max(pos) FROM sessions.outbox)"
        )
        if dry_run:
            stats.events_trimmed += int(
                await self.pool.fetchval(f"SELECT count(*) FROM ({old_events}) x", retention)
            )
            return
        while True:
            done = _count(
                await self.pool.execute(
                    f"DELETE FROM sessions.outbox WHERE id IN ({old_events} LIMIT {size})", retention
                )
            )
            stats.events_trimmed += done
            if done < size:
                break
        while True:
            done = _count(
                await self.pool.execute(
                    "DELETE FROM sessions.activations WHERE id IN (SELECT id FROM sessions.activations "
                    f"WHERE ended_at < now() - make_interval(secs => $1) LIMIT {size})",
                    retention,
                )
            )
            if done < size:
                break


def _stats_dict(stats: sessions_pb2.PruneStats) -> dict[str, int]:
    return {f.name: getattr(stats, f.name) for f in stats.DESCRIPTOR.fields}
