"""The sessions schema: sessions, snapshots, activations and the outbox.

Every method takes the caller's org and scopes its SQL by it, so one org can
never read or change another's rows. Lifecycle events are written to
``sessions.outbox`` in the same transaction as the change they describe, and
handed to in-process listeners (hooks) after the commit.

Activations (one ``session.start`` ... exactly one ``session.end``) belong to
the instance that opened them. Every way an activation ends is one
``UPDATE ... WHERE ended_at IS NULL`` whose rows produce the ``session.end``
events in the same transaction, so no activation ends twice, whichever
instance, sweep or drain gets there first. Bulk endings (drain, crash
recovery, idle expiry) are set-based: one statement per batch of rows.

Compaction rolls a key over to a new session; a run whose token names the
old session follows the rollover (``_follow``), because the conversation goes
on there. A reset does not: the reset session, and the compaction
predecessors whose transcript it continued, are purged (or archived) and
never served again.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from runyard import __version__
from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard.common import metrics
from runyard.common.auth import RunClaims
from runyard.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from runyard.common.outbox import Outbox
from runyard.common.pagination import decode_time_cursor, page_size, time_cursor_page
from runyard.common.protoutil import now, timestamp

__all__ = ["EVENTS_CHANNEL", "SessionStore", "SnapshotRead", "session_proto"]

log = logging.getLogger(__name__)

#: NOTIFY channel announcing newly sequenced outbox events.
EVENTS_CHANNEL = "runyard_sessions_events"

_END_REASONS = {
    name.removeprefix("SESSION_END_REASON_"): value
    for name, value in common_pb2.SessionEndReason.items()
    if value
}

_SESSION_COLUMNS = (
    "id, org_id, key, agent_id, parent_session_id, resumed_from_session_id, next_session_id, "
    "created_at, updated_at, ended_at, end_reason, message_count, head_snapshot_id"
)

#: Longest compaction chain followed (a guard; real chains are short).
_MAX_CHAIN = 1000

#: The compaction chain starting at $1, in order: the session a run token's
#: conversation continues in is the last. Only sessions that still exist are
#: followed (a successor may have been deleted); empty if $1 does not exist.
_CHAIN_SQL = f"""
WITH RECURSIVE chain(id, depth) AS (
    SELECT id, 0 FROM sessions.sessions WHERE id = $1
    UNION ALL
    SELECT n.id, c.depth + 1
    FROM chain c
    JOIN sessions.sessions s ON s.id = c.id
    JOIN sessions.sessions n ON n.id = s.next_session_id
    WHERE s.end_reason = 'COMPACTION' AND c.depth < {_MAX_CHAIN}
)
SELECT id FROM chain ORDER BY depth
"""

#: $1 and the compaction predecessors whose transcript it continues.
_PREDECESSORS_SQL = f"""
WITH RECURSIVE back(id, depth) AS (
    SELECT $1::uuid, 0
    UNION ALL
    SELECT p.id, b.depth + 1
    FROM back b JOIN sessions.sessions p ON p.next_session_id = b.id AND p.end_reason = 'COMPACTION'
    WHERE b.depth < {_MAX_CHAIN}
)
SELECT id FROM back
"""

#: End up to $1 open activations matching {condition} with reason $2, in one
#: statement; returns what the session.end events need. SKIP LOCKED: rows a
#: concurrent reset/delete/compaction holds are ended by that transaction.
_END_ACTIVATIONS_SQL = """
WITH target AS (
    SELECT a.id FROM sessions.activations a {join}
    WHERE a.ended_at IS NULL AND {condition}
    ORDER BY a.id
    LIMIT $1
    FOR UPDATE {lock} SKIP LOCKED
), ended AS (
    UPDATE sessions.activations a SET ended_at = now(), end_reason = $2
    FROM target WHERE a.id = target.id AND a.ended_at IS NULL
    RETURNING a.session_id, a.org_id, a.instance_id, a.started_at, a.ended_at
)
SELECT e.session_id AS id, e.org_id, e.instance_id, e.started_at, e.ended_at,
       coalesce(s.key, '') AS key, coalesce(s.agent_id, '') AS agent_id,
       coalesce(s.message_count, 0) AS message_count
FROM ended e LEFT JOIN sessions.sessions s ON s.id = e.session_id
"""

#: Default rows per statement for bulk endings.
END_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class SnapshotRead:
    """What :meth:`SessionStore.get_snapshot` returns.

    ``data`` is the serialized ``Transcript`` (b"" for none); ``session_id``
    is the session it belongs to (the token's, or its compaction successor);
    ``run_committed`` says whether the token's run already has a completed
    snapshot.
    """

    data: bytes
    snapshot_id: str
    run_id: str
    run_committed: bool
    session_id: str
    #: Epoch at which the token's run committed (None: not committed).
    committed_epoch: int | None = None


def session_proto(row: asyncpg.Record) -> common_pb2.Session:
    """A ``Session`` message from a ``sessions.sessions`` row."""
    session = common_pb2.Session(
        id=str(row["id"]),
        org_id=row["org_id"],
        key=row["key"],
        agent_id=row["agent_id"],
        create_time=timestamp(row["created_at"]),
        update_time=timestamp(row["updated_at"]),
        message_count=row["message_count"],
        current=row["ended_at"] is None,
        parent_session_id=str(row["parent_session_id"] or ""),
        resumed_from_session_id=str(row["resumed_from_session_id"] or ""),
        next_session_id=str(row["next_session_id"] or ""),
    )
    if row["ended_at"] is not None:
        session.end_time.CopyFrom(timestamp(row["ended_at"]))
        session.end_reason = _END_REASONS.get(row["end_reason"] or "", 0)
    return session


def _event(
    type_: str,
    row: asyncpg.Record | dict[str, Any],
    *,
    source: str,
    **data: Any,
) -> common_pb2.LifecycleEvent:
    event = common_pb2.LifecycleEvent(
        type=type_,
        time=now(),
        org_id=row["org_id"],
        session_id=str(row["id"]),
        session_key=row["key"],
        agent_id=row["agent_id"],
        source=source,
    )
    for name, message in data.items():
        getattr(event, name).CopyFrom(message)
    return event


def _end_event(
    row: Mapping[str, Any],
    reason: str,
    *,
    source: str,
    next_session_id: uuid.UUID | None = None,
    message_count: int | None = None,
) -> common_pb2.LifecycleEvent:
    """``session.end`` for an ended activation; ``row`` has the session's id,
    org_id, key, agent_id, message_count and the activation's started_at/ended_at."""
    duration = row["ended_at"] - row["started_at"]
    return _event(
        "session.end",
        row,
        source=source,
        session_end=common_pb2.SessionEndData(
            reason=_END_REASONS[reason],
            message_count=row["message_count"] if message_count is None else message_count,
            duration_ms=max(int(duration / dt.timedelta(milliseconds=1)), 0),
            next_session_id=str(next_session_id or ""),
            next_session_key=row["key"] if next_session_id else "",
        ),
    )


class SessionStore:
    """SQL for the sessions service.

    Args:
        pool: asyncpg pool on the database holding the ``sessions`` schema.
        instance_id: this service instance (owner of the activations it starts).
        max_snapshot_bytes: largest transcript accepted by :meth:`put_snapshot`.
        archive_on_reset: keep a reset session's snapshots as ``archived``
            instead of deleting them.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        instance_id: str,
        max_snapshot_bytes: int,
        archive_on_reset: bool = False,
    ):
        self.pool = pool
        self.instance_id = instance_id
        self.max_snapshot_bytes = max_snapshot_bytes
        self.archive_on_reset = archive_on_reset
        self.outbox = Outbox("sessions", EVENTS_CHANNEL)
        #: Called with the events of every committed transaction (in-process hooks).
        self.listeners: list[Callable[[Sequence[common_pb2.LifecycleEvent]], None]] = []

    # ------------------------------------------------------------ outbox

    async def _emit(self, conn: asyncpg.Connection, events: Sequence[common_pb2.LifecycleEvent]) -> None:
        await self.outbox.emit(conn, events)

    def _written(self, events: Sequence[common_pb2.LifecycleEvent] = ()) -> None:
        """After a commit: wake the sequencer and hand ``events`` to listeners."""
        self.outbox.written()
        if not events:
            return
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:
                log.exception("lifecycle event listener failed")

    async def sequence_outbox(self) -> int:
        """Sequence committed outbox rows (see :meth:`Outbox.sequence`)."""
        return await self.outbox.sequence(self.pool)

    async def list_events(
        self, after_id: int, limit: int, types: Sequence[str] = ()
    ) -> list[common_pb2.LifecycleEvent]:
        """Sequenced events with ``pos > after_id``, oldest first."""
        return await self.outbox.read(self.pool, after_id, limit, types)

    # ------------------------------------------------------------ lookups

    async def _find(
        self,
        conn: asyncpg.Connection | asyncpg.Pool,
        org_id: str,
        session_id: uuid.UUID | None,
        key: str,
        *,
        for_update: bool = False,
        current_only: bool = False,
    ) -> asyncpg.Record:
        lock = " FOR UPDATE" if for_update else ""
        if session_id is not None:
            row = await conn.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM sessions.sessions WHERE id = $1 AND org_id = $2{lock}",
                session_id,
                org_id,
            )
            if row is None:
                raise NotFound(f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id")
            if current_only and row["ended_at"] is not None:
                raise FailedPrecondition(
                    f"session {session_id} has ended ({(row['end_reason'] or '').lower()}); "
                    f"its key now points to {row['next_session_id'] or 'a new session'}",
                    reason="SESSION_ENDED",
                    field="session_id",
                )
            return row
        if not key:
            raise InvalidArgument("session_id or session_key is required", reason="MISSING_FIELD", field="session_key")
        # With a lock, a second read: if a concurrent reset or compaction
        # rolled the key over while this one waited for the row, the first
        # read skips the ended row and cannot see the new one yet.
        for _ in range(2 if for_update else 1):
            row = await conn.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM sessions.sessions"
                f" WHERE org_id = $1 AND key = $2 AND ended_at IS NULL{lock}",
                org_id,
                key,
            )
            if row is not None:
                break
        if row is None:
            raise NotFound(f"no session for key {key[:64]!r}", reason="SESSION_NOT_FOUND", field="session_key")
        return row

    async def get(self, org_id: str, session_id: uuid.UUID | None, key: str) -> common_pb2.Session:
        """The session by id, or the key's current session.

        Raises:
            NotFound: no such session in this org.
        """
        return session_proto(await self._find(self.pool, org_id, session_id, key))

    # ------------------------------------------------------------ activations

    async def _open_activation(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        reason: str,
        resumed_from: uuid.UUID | None = None,
    ) -> list[common_pb2.LifecycleEvent]:
        opened = await conn.fetchval(
            """
            INSERT INTO sessions.activations (session_id, org_id, instance_id, start_reason, resumed_from_session_id)
            VALUES ($1, $2, $3, $4, $5)
            ON CONFLICT (session_id) WHERE ended_at IS NULL DO NOTHING
            RETURNING id
            """,
            row["id"],
            row["org_id"],
            self.instance_id,
            reason,
            resumed_from,
        )
        if opened is None:
            return []
        metrics.ACTIVE_SESSIONS.inc()
        return [
            _event(
                "session.start",
                row,
                source=self.instance_id,
                session_start=common_pb2.SessionStartData(
                    reason=common_pb2.SessionStartReason.Value(f"SESSION_START_REASON_{reason}"),
                    resumed_from_session_id=str(resumed_from or ""),
                ),
            )
        ]

    async def _close_activation(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        reason: str,
        *,
        next_session_id: uuid.UUID | None = None,
        message_count: int | None = None,
    ) -> list[common_pb2.LifecycleEvent]:
        closed = await conn.fetchrow(
            """
            UPDATE sessions.activations SET ended_at = now(), end_reason = $2
            WHERE session_id = $1 AND ended_at IS NULL
            RETURNING started_at, ended_at, instance_id
            """,
            row["id"],
            reason,
        )
        if closed is None:
            return []
        if closed["instance_id"] == self.instance_id:
            metrics.ACTIVE_SESSIONS.dec()
        metrics.SESSION_ENDS_TOTAL.labels(reason).inc()
        merged = {**dict(row), "started_at": closed["started_at"], "ended_at": closed["ended_at"]}
        return [
            _end_event(
                merged, reason, source=self.instance_id, next_session_id=next_session_id, message_count=message_count
            )
        ]

    async def _insert_session(
        self,
        conn: asyncpg.Connection,
        org_id: str,
        key: str,
        agent_id: str,
        parent_session_id: uuid.UUID | None,
        resumed_from: uuid.UUID | None = None,
    ) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"""
            INSERT INTO sessions.sessions (id, org_id, key, agent_id, parent_session_id, resumed_from_session_id)
            VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT (org_id, key) WHERE ended_at IS NULL DO NOTHING
            RETURNING {_SESSION_COLUMNS}
            """,
            uuid.uuid4(),
            org_id,
            key,
            agent_id,
            parent_session_id,
            resumed_from,
        )

    # ------------------------------------------------------------ resolve / reset / delete

    async def resolve(
        self,
        org_id: str,
        key: str,
        agent_id: str,
        *,
        parent_session_id: uuid.UUID | None = None,
        create: bool = True,
    ) -> tuple[common_pb2.Session, bool]:
        """The key's current session, created (session.start NEW) if missing.

        Marks the session active now and opens an activation if none is open
        (session.start RESUMED).

        Returns:
            ``(session, created)``.

        Raises:
            NotFound: no session and ``create`` is False.
            FailedPrecondition: the key's session belongs to another agent
                (reason SESSION_AGENT_MISMATCH).
        """
        for _ in range(3):
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""
                    UPDATE sessions.sessions SET last_active_at = now()
                    WHERE org_id = $1 AND key = $2 AND ended_at IS NULL
                    RETURNING {_SESSION_COLUMNS}
                    """,
                    org_id,
                    key,
                )
                created = False
                if row is None:
                    if not create:
                        raise NotFound(f"no session for key {key[:64]!r}", reason="SESSION_NOT_FOUND", field="session_key")
                    row = await self._insert_session(conn, org_id, key, agent_id, parent_session_id)
                    if row is None:
                        continue  # a concurrent caller created it; read it again
                    created = True
                elif agent_id and row["agent_id"] != agent_id:
                    raise FailedPrecondition(
                        f"session key {key!r} belongs to agent {row['agent_id']!r}, not {agent_id!r}",
                        reason="SESSION_AGENT_MISMATCH",
                        field="agent_id",
                    )
                events = await self._open_activation(conn, row, "NEW" if created else "RESUMED")
                await self._emit(conn, events)
            if events:
                self._written(events)
            return session_proto(row), created
        raise FailedPrecondition(f"session key {key!r} is contended; retry", reason="SESSION_CONTENDED", retryable=True)

    async def reset(
        self, org_id: str, session_id: uuid.UUID | None, key: str
    ) -> tuple[common_pb2.Session, str]:
        """Roll the key over to a new, empty session.

        The old session ends (session.end RESET with next_session_id) and its
        snapshots are purged (or archived); a new session starts (NEW).

        Returns:
            ``(new session, previous session id)``.

        Raises:
            NotFound: no such session. FailedPrecondition: it has already ended.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            old = await self._find(conn, org_id, session_id, key, for_update=True, current_only=True)
            await conn.execute(
                "UPDATE sessions.sessions SET ended_at = now(), end_reason = 'RESET', updated_at = now() WHERE id = $1",
                old["id"],
            )
            new = await self._insert_session(conn, org_id, old["key"], old["agent_id"], old["parent_session_id"])
            assert new is not None  # the old row ended in this transaction
            await conn.execute(
                "UPDATE sessions.sessions SET next_session_id = $2 WHERE id = $1", old["id"], new["id"]
            )
            # The transcript being forgotten lives in this session and in the
            # compaction predecessors it continued: none of it is served again.
            purged = [r["id"] for r in await conn.fetch(_PREDECESSORS_SQL, old["id"])]
            await conn.execute(
                "UPDATE sessions.sessions SET head_snapshot_id = NULL WHERE id = ANY($1::uuid[])", purged
            )
            if self.archive_on_reset:
                await conn.execute(
                    "UPDATE sessions.snapshots SET state = 'archived' "
                    "WHERE session_id = ANY($1::uuid[]) AND state <> 'archived'",
                    purged,
                )
            else:
                await conn.execute("DELETE FROM sessions.snapshots WHERE session_id = ANY($1::uuid[])", purged)
            events = await self._close_activation(conn, old, "RESET", next_session_id=new["id"])
            events += await self._open_activation(conn, new, "NEW")
            await self._emit(conn, events)
        self._written(events)
        return session_proto(new), str(old["id"])

    async def delete(self, org_id: str, session_id: uuid.UUID | None, key: str) -> str:
        """Delete a session and its snapshots (session.end DELETED).

        Returns the deleted session's id. Raises NotFound.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._find(conn, org_id, session_id, key, for_update=True)
            events = await self._close_activation(conn, row, "DELETED")
            await conn.execute("DELETE FROM sessions.sessions WHERE id = $1", row["id"])
            await self._emit(conn, events)
        self._written(events)
        return str(row["id"])

    # ------------------------------------------------------------ listing

    async def list(
        self,
        org_id: str,
        *,
        agent_id: str = "",
        size: int = 0,
        token: str = "",
        include_ended: bool = False,
        parent_session_id: uuid.UUID | None = None,
    ) -> tuple[list[common_pb2.Session], str]:
        """One page of the org's sessions, oldest first (keyset pagination)."""
        limit = page_size(size)
        after = decode_time_cursor("sessions", token)
        rows = await self.pool.fetch(
            f"""
            SELECT {_SESSION_COLUMNS} FROM sessions.sessions
            WHERE org_id = $1
              AND ($2 = '' OR agent_id = $2)
              AND ($3 OR ended_at IS NULL)
              AND ($4::uuid IS NULL OR parent_session_id = $4)
              AND ($5::timestamptz IS NULL OR (created_at, id) > ($5, $6))
            ORDER BY created_at, id
            LIMIT $7
            """,
            org_id,
            agent_id,
            include_ended,
            parent_session_id,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
        page, next_token = time_cursor_page("sessions", rows, limit)
        return [session_proto(r) for r in page], next_token

    # ------------------------------------------------------------ snapshots

    async def _follow(self, conn: asyncpg.Connection | asyncpg.Pool, session_id: uuid.UUID) -> list[uuid.UUID]:
        """``session_id`` and its compaction successors, in order (the last is current)."""
        return [r["id"] for r in await conn.fetch(_CHAIN_SQL, session_id)]

    async def _session_for_token(
        self,
        conn: asyncpg.Connection,
        claims: RunClaims,
        session_id: str = "",
    ) -> asyncpg.Record:
        """The session a run token may act on: the token's session, or the
        session a compaction rolled it over to.

        Raises:
            PermissionDenied: ``session_id`` is not the token's session, or
                the token's agent is not the session's (TOKEN_SCOPE_MISMATCH).
            NotFound: no such session in the token's org.
            FailedPrecondition: the conversation has ended (reset, deleted...).
        """
        if session_id and session_id != claims.session_id:
            raise PermissionDenied(
                "run token is not scoped to this session", reason="TOKEN_SCOPE_MISMATCH", field="session_id"
            )
        row = await conn.fetchrow(
            f"SELECT {_SESSION_COLUMNS} FROM sessions.sessions WHERE id = $1", uuid.UUID(claims.session_id)
        )
        if row is None or row["org_id"] != claims.org_id:
            raise NotFound(f"session {claims.session_id} not found", reason="SESSION_NOT_FOUND")
        if row["agent_id"] != claims.agent_id:
            raise PermissionDenied("run token is not scoped to this session's agent", reason="TOKEN_SCOPE_MISMATCH")
        if row["ended_at"] is not None:
            # Compaction rolled the conversation over: follow it.
            chain = await self._follow(conn, row["id"])
            if chain:
                row = await conn.fetchrow(
                    f"SELECT {_SESSION_COLUMNS} FROM sessions.sessions WHERE id = $1", chain[-1]
                ) or row
        if row["ended_at"] is not None:
            raise FailedPrecondition(
                f"session {claims.session_id} has ended ({(row['end_reason'] or '').lower()})",
                reason="SESSION_ENDED",
            )
        return row

    async def get_snapshot(self, claims: RunClaims, session_id: str = "") -> SnapshotRead:
        """The latest completed transcript of the token's conversation.

        Marks the session active (a run is starting), so idle expiry leaves it.

        Raises:
            See :meth:`_session_for_token`.
        """
        async with self.pool.acquire() as conn:
            row = await self._session_for_token(conn, claims, session_id)
            await conn.execute("UPDATE sessions.sessions SET last_active_at = now() WHERE id = $1", row["id"])
            snap = None
            if row["head_snapshot_id"] is not None:
                snap = await conn.fetchrow(
                    "SELECT id, run_id, data FROM sessions.snapshots WHERE id = $1 AND state = 'completed'",
                    row["head_snapshot_id"],
                )
            committed = await conn.fetchval(
                "SELECT max(epoch) FROM sessions.snapshots WHERE run_id = $1 AND state = 'completed'",
                uuid.UUID(claims.run_id),
            )
        done = committed is not None
        if snap is None:
            return SnapshotRead(b"", "", "", done, str(row["id"]), committed)
        return SnapshotRead(bytes(snap["data"]), str(snap["id"]), str(snap["run_id"]), done, str(row["id"]), committed)

    def _check_size(self, size: int) -> None:
        if size > self.max_snapshot_bytes:
            raise ResourceExhausted(
                f"transcript is {size} bytes; the limit is {self.max_snapshot_bytes} "
                "(sessions.max_snapshot_bytes)",
                reason="SNAPSHOT_TOO_LARGE",
                field="transcript",
                retryable=False,
            )

    async def put_snapshot(
        self,
        claims: RunClaims,
        data: bytes,
        message_count: int,
        *,
        session_id: str = "",
        base_snapshot_id: str | None = None,
        compaction: sessions_pb2.CompactionInfo | None = None,
    ) -> str:
        """Store the run's new transcript as pending (idempotent per run and epoch).

        Args:
            claims: the run token's scope.
            data: serialized ``Transcript``.
            message_count: messages in it.
            session_id: the session the caller means (must be the token's).
            base_snapshot_id: the head the transcript was built on ("" = none,
                None = not said); a commit after another run's is rebased.
            compaction: set when the transcript is compacted; the commit then
                rolls the key over to a new session.

        Raises:
            ResourceExhausted: larger than ``max_snapshot_bytes`` (SNAPSHOT_TOO_LARGE).
            PermissionDenied: another session than the token's (TOKEN_SCOPE_MISMATCH).
            FailedPrecondition: the session has ended (SESSION_ENDED), or the
                run's result was already committed (RUN_ALREADY_COMMITTED).
        """
        self._check_size(len(data))
        run_id = uuid.UUID(claims.run_id)
        base: uuid.UUID | None = None
        if base_snapshot_id:
            try:
                base = uuid.UUID(base_snapshot_id)
            except ValueError:
                raise InvalidArgument(
                    "base_snapshot_id is not a snapshot id", reason="INVALID_ID", field="base_snapshot_id"
                ) from None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._session_for_token(conn, claims, session_id)
            committed_epoch = await conn.fetchval(
                "SELECT epoch FROM sessions.snapshots WHERE run_id = $1 AND state = 'completed'", run_id
            )
            if committed_epoch is not None and committed_epoch != claims.epoch:
                raise FailedPrecondition(
                    f"run {claims.run_id} already has a completed snapshot (epoch {committed_epoch})",
                    reason="RUN_ALREADY_COMMITTED",
                )
            snapshot_id = await conn.fetchval(
                """
                INSERT INTO sessions.snapshots (id, session_id, org_id, run_id, epoch, state, data, size_bytes,
                    message_count, base_snapshot_id, based, compaction)
                VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $8, $9, $10, $11)
                ON CONFLICT (run_id, epoch) DO UPDATE SET epoch = EXCLUDED.epoch
                RETURNING id
                """,
                uuid.uuid4(),
                row["id"],
                claims.org_id,
                run_id,
                claims.epoch,
                data,
                len(data),
                message_count,
                base,
                base_snapshot_id is not None,
                compaction.SerializeToString() if compaction is not None else None,
            )
            await conn.execute("UPDATE sessions.sessions SET last_active_at = now() WHERE id = $1", row["id"])
        metrics.SNAPSHOT_BYTES.observe(len(data))
        return str(snapshot_id)

    async def commit_snapshot(
        self, org_id: str, session_id: uuid.UUID, run_id: uuid.UUID, epoch: int
    ) -> tuple[str, int, str]:
        """Make the run's pending snapshot of ``epoch`` the conversation's latest.

        Idempotent per run: once a run's snapshot is committed, a repeat
        returns it. ``session_id`` is the run's session; the snapshot lands in
        its current compaction successor. If another run committed after this
        run read its transcript, this run's own messages are appended to the
        newer transcript (nothing is lost, and a compaction is then skipped).
        A compacted snapshot rolls the key over: session.end COMPACTION on the
        old session, session.start RESUMED and session.compacted on the new.

        Returns:
            ``(snapshot id, message count, id of the session holding it)``.

        Raises:
            NotFound: session or pending snapshot missing (SNAPSHOT_NOT_FOUND).
            FailedPrecondition: the conversation ended (SESSION_ENDED).
        """
        events: list[common_pb2.LifecycleEvent] = []
        async with self.pool.acquire() as conn, conn.transaction():
            requested = await conn.fetchrow(
                "SELECT id FROM sessions.sessions WHERE id = $1 AND org_id = $2", session_id, org_id
            )
            if requested is None:
                raise NotFound(f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id")
            # A run's result is fixed once committed; the gateway only asks for
            # the epoch it holds, so a repeat (even after a re-claim that found
            # the run committed) confirms it.
            done = await self._committed(conn, run_id)
            if done is not None:
                return done
            for _ in range(3):
                chain = await self._follow(conn, session_id)
                current = None
                if chain:
                    current = await conn.fetchrow(
                        f"SELECT {_SESSION_COLUMNS} FROM sessions.sessions WHERE id = $1 FOR UPDATE", chain[-1]
                    )
                if current is None:  # deleted meanwhile
                    raise NotFound(f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id")
                if current["end_reason"] != "COMPACTION":
                    break
                # A concurrent compaction rolled it over while we waited for
                # the lock: follow the chain again.
            if current["ended_at"] is not None:
                raise FailedPrecondition(
                    f"session {session_id} has ended ({(current['end_reason'] or '').lower()}); "
                    "the run's result is discarded",
                    reason="SESSION_ENDED",
                )
            snap = await conn.fetchrow(
                """
                SELECT id, session_id, base_snapshot_id, based, compaction, message_count, data
                FROM sessions.snapshots
                WHERE run_id = $1 AND epoch = $2 AND state = 'pending' AND session_id = ANY($3::uuid[])
                FOR UPDATE
                """,
                run_id,
                epoch,
                chain,
            )
            if snap is None:
                # A concurrent repeat of this commit may have won the lock.
                done = await self._committed(conn, run_id)
                if done is not None:
                    return done
                raise NotFound(
                    f"no pending snapshot for run {run_id} epoch {epoch}", reason="SNAPSHOT_NOT_FOUND"
                )
            count = snap["message_count"]
            compaction = snap["compaction"]
            stale = snap["session_id"] != current["id"] or (
                snap["based"] and snap["base_snapshot_id"] != current["head_snapshot_id"]
            )
            if stale:
                count = await self._rebase(conn, snap["id"], bytes(snap["data"]), current, run_id)
                compaction = None
            target = current
            if compaction is not None:
                target, rollover = await self._roll_over(conn, current, snap["id"], count, compaction)
                events += rollover
            await conn.execute(
                "UPDATE sessions.snapshots SET state = 'completed', committed_at = now() WHERE id = $1", snap["id"]
            )
            await conn.execute(
                "DELETE FROM sessions.snapshots WHERE run_id = $1 AND state = 'pending'", run_id
            )
            updated = await conn.fetchrow(
                f"""
                UPDATE sessions.sessions
                SET head_snapshot_id = $2, message_count = $3, updated_at = now(), last_active_at = now()
                WHERE id = $1 RETURNING {_SESSION_COLUMNS}
                """,
                target["id"],
                snap["id"],
                count,
            )
            event = _event("session.updated", updated, source=self.instance_id)
            event.run_id = str(run_id)
            events.append(event)
            await self._emit(conn, events)
        self._written(events)
        return str(snap["id"]), count, str(target["id"])

    @staticmethod
    async def _committed(conn: asyncpg.Connection, run_id: uuid.UUID) -> tuple[str, int, str] | None:
        """``commit_snapshot``'s answer for a run already committed, else None."""
        done = await conn.fetchrow(
            "SELECT id, session_id, message_count FROM sessions.snapshots WHERE run_id = $1 AND state = 'completed'",
            run_id,
        )
        if done is None:
            return None
        return str(done["id"]), done["message_count"], str(done["session_id"])

    async def _rebase(
        self,
        conn: asyncpg.Connection,
        snapshot_id: uuid.UUID,
        data: bytes,
        current: asyncpg.Record,
        run_id: uuid.UUID,
    ) -> int:
        """Rewrite a pending snapshot as the current head plus the run's own
        messages; returns its message count."""
        head = b""
        if current["head_snapshot_id"] is not None:
            head = bytes(
                await conn.fetchval(
                    "SELECT data FROM sessions.snapshots WHERE id = $1 AND state = 'completed'",
                    current["head_snapshot_id"],
                )
                or b""
            )
        transcript = common_pb2.Transcript.FromString(head)
        mine = [m for m in common_pb2.Transcript.FromString(data).messages if m.run_id == str(run_id)]
        transcript.messages.extend(mine)
        rebased = transcript.SerializeToString(deterministic=True)
        self._check_size(len(rebased))
        await conn.execute(
            """
            UPDATE sessions.snapshots
            SET session_id = $2, data = $3, size_bytes = $4, message_count = $5, compaction = NULL,
                base_snapshot_id = $6
            WHERE id = $1
            """,
            snapshot_id,
            current["id"],
            rebased,
            len(rebased),
            len(transcript.messages),
            current["head_snapshot_id"],
        )
        log.info(
            "run %s committed after another run of session %s: appended its %d message(s) to the newer transcript",
            run_id, current["id"], len(mine),
        )
        return len(transcript.messages)

    async def _roll_over(
        self,
        conn: asyncpg.Connection,
        current: asyncpg.Record,
        snapshot_id: uuid.UUID,
        count: int,
        compaction: bytes,
    ) -> tuple[asyncpg.Record, list[common_pb2.LifecycleEvent]]:
        """Compaction: end ``current``, start its successor holding the
        snapshot. Returns the new session row and the events."""
        info = sessions_pb2.CompactionInfo.FromString(compaction)
        await conn.execute(
            "UPDATE sessions.sessions SET ended_at = now(), end_reason = 'COMPACTION', updated_at = now() "
            "WHERE id = $1",
            current["id"],
        )
        new = await self._insert_session(
            conn, current["org_id"], current["key"], current["agent_id"], current["parent_session_id"], current["id"]
        )
        assert new is not None  # the key's current session ended in this transaction
        await conn.execute(
            "UPDATE sessions.sessions SET next_session_id = $2 WHERE id = $1", current["id"], new["id"]
        )
        await conn.execute("UPDATE sessions.snapshots SET session_id = $2 WHERE id = $1", snapshot_id, new["id"])
        events = await self._close_activation(conn, current, "COMPACTION", next_session_id=new["id"])
        events += await self._open_activation(conn, new, "RESUMED", resumed_from=current["id"])
        compacted = _event(
            "session.compacted",
            new,
            source=self.instance_id,
            session_compacted=common_pb2.SessionCompactedData(
                previous_session_id=str(current["id"]),
                summarized_message_count=info.summarized_message_count,
                kept_message_count=info.kept_message_count,
                tokens_before=info.tokens_before,
                tokens_after=info.tokens_after,
                model=info.model,
            ),
        )
        events.append(compacted)
        metrics.COMPACTIONS_TOTAL.labels("rolled_over").inc()
        log.info(
            "session %s (%s) compacted: %d message(s) summarised, %d kept; key now at session %s",
            current["id"], current["key"], info.summarized_message_count, info.kept_message_count, new["id"],
        )
        return new, events

    async def head_transcript(self, org_id: str, session_id: uuid.UUID | None, key: str) -> tuple[asyncpg.Record, bytes]:
        """The session row and its latest completed transcript bytes (b"" if none)."""
        async with self.pool.acquire() as conn:
            row = await self._find(conn, org_id, session_id, key)
            if row["head_snapshot_id"] is None:
                return row, b""
            data = await conn.fetchval(
                "SELECT data FROM sessions.snapshots WHERE id = $1 AND state = 'completed'", row["head_snapshot_id"]
            )
        return row, bytes(data or b"")

    # ------------------------------------------------------------ instance, drain, recovery, idle

    def _service_event(self, type_: str, mode: str = "") -> common_pb2.LifecycleEvent:
        return common_pb2.LifecycleEvent(
            type=type_,
            time=now(),
            source=self.instance_id,
            service=common_pb2.ServiceLifecycleData(
                service="sessions", instance_id=self.instance_id, version=__version__, mode=mode
            ),
        )

    async def register_instance(self, lease_s: float) -> None:
        """Record this instance and its lease (before it opens any activation);
        emits ``service.startup``."""
        event = self._service_event("service.startup")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """
                INSERT INTO sessions.instances (instance_id, lease_expires_at)
                VALUES ($1, now() + make_interval(secs => $2))
                ON CONFLICT (instance_id) DO UPDATE
                SET lease_expires_at = EXCLUDED.lease_expires_at, stopped_at = NULL
                """,
                self.instance_id,
                lease_s,
            )
            await self._emit(conn, [event])
        self._written([event])

    async def renew_lease(self, lease_s: float) -> bool:
        """Extend this instance's lease; False if it had lapsed (another
        instance may have recovered its activations meanwhile)."""
        lapsed = await self.pool.fetchval(
            """
            UPDATE sessions.instances i SET lease_expires_at = now() + make_interval(secs => $2)
            FROM (SELECT lease_expires_at AS old FROM sessions.instances WHERE instance_id = $1 FOR UPDATE) o
            WHERE i.instance_id = $1
            RETURNING o.old < now()
            """,
            self.instance_id,
            lease_s,
        )
        if lapsed is None:
            await self.register_instance(lease_s)
            return False
        return not lapsed

    async def _end_activations(
        self,
        reason: str,
        condition: str,
        args: Sequence[Any],
        *,
        batch: int,
        join: str = "",
        lock: str = "OF a",
        limit: int | None = None,
        hold: list[common_pb2.LifecycleEvent] | None = None,
    ) -> int:
        """End open activations matching ``condition`` with ``reason``, a
        batch per transaction, the session.end events written in the same
        transaction (one insert). Returns how many ended.

        With ``hold``, the committed events are appended to it instead of
        being handed to the listeners (the caller does that later)."""
        sql = _END_ACTIVATIONS_SQL.format(condition=condition, join=join, lock=lock)
        total = 0
        while limit is None or total < limit:
            size = batch if limit is None else min(batch, limit - total)
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch(sql, size, reason, *args)
                events = [_end_event(row, reason, source=self.instance_id) for row in rows]
                await self._emit(conn, events)
            if not rows:
                break
            total += len(rows)
            metrics.SESSION_ENDS_TOTAL.labels(reason).inc(len(rows))
            if hold is not None:
                hold.extend(events)
                self.outbox.written()
            else:
                self._written(events)
            if len(rows) < size:
                break
        return total

    async def end_owned(self, reason: str, *, batch: int = END_BATCH) -> int:
        """Drain: end every activation this instance owns (SHUTDOWN or RESTART).

        Every session.end is written durably before any is handed to the
        listeners (hooks), so a handler can neither see an event that is not
        recorded nor slow the recording down. Returns how many ended.
        """
        held: list[common_pb2.LifecycleEvent] = []
        ended = await self._end_activations(reason, "a.instance_id = $3", [self.instance_id], batch=batch, hold=held)
        metrics.ACTIVE_SESSIONS.set(0)
        self._written(held)
        return ended

    async def stop_instance(self, mode: str) -> None:
        """Mark this instance stopped (its lease ends now); emits ``service.shutdown``."""
        event = self._service_event("service.shutdown", mode)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE sessions.instances SET stopped_at = now(), lease_expires_at = now(), shutdown_mode = $2 "
                "WHERE instance_id = $1",
                self.instance_id,
                mode,
            )
            await self._emit(conn, [event])
        self._written([event])

    async def recover_crashed(self, *, batch: int = END_BATCH) -> int:
        """End (CRASH_RECOVERED) open activations whose owner's lease has
        lapsed or that stopped without ending them. Safe to run from any
        number of instances at once: each activation ends once."""
        return await self._end_activations(
            "CRASH_RECOVERED",
            """a.instance_id <> $3 AND NOT EXISTS (
                   SELECT 1 FROM sessions.instances i
                   WHERE i.instance_id = a.instance_id AND i.stopped_at IS NULL AND i.lease_expires_at > now())""",
            [self.instance_id],
            batch=batch,
        )

    async def expire_idle(self, idle_timeout_s: float, *, batch: int = END_BATCH) -> int:
        """End (IDLE) this instance's activations whose session had no run for
        ``idle_timeout_s`` seconds. A session a concurrent resolve is touching
        is skipped (row lock), so a new message never loses its activation."""
        return await self._end_activations(
            "IDLE",
            "a.instance_id = $3 AND s.last_active_at < now() - make_interval(secs => $4)",
            [self.instance_id, idle_timeout_s],
            batch=batch,
            join="JOIN sessions.sessions s ON s.id = a.session_id",
            lock="OF a, s",
        )

    async def count_owned(self) -> int:
        """Open activations owned by this instance (sets the active-sessions gauge)."""
        count = int(
            await self.pool.fetchval(
                "SELECT count(*) FROM sessions.activations WHERE instance_id = $1 AND ended_at IS NULL",
                self.instance_id,
            )
        )
        metrics.ACTIVE_SESSIONS.set(count)
        return count

    async def forget_instances(self, older_than_s: float = 86_400.0) -> int:
        """Delete rows of instances gone for ``older_than_s`` that own no open activation."""
        status = await self.pool.execute(
            """
            DELETE FROM sessions.instances i
            WHERE i.lease_expires_at < now() - make_interval(secs => $1)
              AND NOT EXISTS (SELECT 1 FROM sessions.activations a
                              WHERE a.instance_id = i.instance_id AND a.ended_at IS NULL)
            """,
            older_than_s,
        )
        return int(status.split()[-1])
