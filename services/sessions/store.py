"""The sessions schema: sessions, transcripts, activations and the outbox.

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

A transcript is stored as turns (``sessions.turns``): each committed run
appends one row with only its own messages, so the bytes a turn writes do
not grow with the conversation, and the run's commit is that row (a run has
at most one, ever). Reading a transcript concatenates the session's current
turns (serialized ``Transcript`` messages concatenate into one).

Compaction rolls a key over to a new session that starts with a checkpoint
turn (summary and kept messages); a run whose token names the old session
follows the rollover (``_follow``), because the conversation goes on there.
A reset does not: the reset session, and the compaction predecessors whose
transcript it continued, are purged (or archived) and never served again.

The hot paths (resolving an active session, reading a transcript) are one
read-only statement: ``last_active_at`` is refreshed only when it is older
than ``touch_interval_s``, and an activation is (re)opened only when none is
open or its owner is dead.
"""

from __future__ import annotations

import builtins
import collections
import datetime as dt
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg

from runyard._proto.v1 import common_pb2, sessions_pb2
from runyard._version import __version__
from runyard.common import db, metrics
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

__all__ = ["EVENTS_CHANNEL", "CommitResult", "SessionStore", "TranscriptRead", "session_proto"]

log = logging.getLogger(__name__)

#: NOTIFY channel announcing new outbox events.
EVENTS_CHANNEL = "runyard_sessions_events"

# items() is typed with plain ints in protobuf's stubs.
_END_REASONS = cast(
    "dict[str, common_pb2.SessionEndReason]",
    {
        name.removeprefix("SESSION_END_REASON_"): value
        for name, value in common_pb2.SessionEndReason.items()
        if value
    },
)

_SESSION_COLUMNS = (
    "id, org_id, key, agent_id, parent_session_id, resumed_from_session_id, next_session_id, "
    "created_at, updated_at, ended_at, end_reason, message_count, head_turn, transcript_bytes"
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

#: The key's current session with what resolve needs to decide whether to
#: write anything: $3 = touch interval (s), $4 = this instance; and its
#: transcript when at most $5 bytes ($5 = 0: never).
_RESOLVE_SQL = f"""
SELECT {", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))},
       s.last_active_at < now() - make_interval(secs => $3) AS stale,
       CASE WHEN $5 > 0 AND s.transcript_bytes <= $5 THEN
           coalesce((SELECT string_agg(t.data, ''::bytea ORDER BY t.turn) FROM sessions.turns t
                     WHERE t.session_id = s.id AND t.state = 'current'), ''::bytea) END AS transcript,
       a.instance_id AS activation_owner,
       (a.id IS NOT NULL AND a.instance_id <> $4 AND NOT EXISTS (
            SELECT 1 FROM sessions.instances i
            WHERE i.instance_id = a.instance_id AND i.stopped_at IS NULL AND i.lease_expires_at > now()))
           AS orphaned
FROM sessions.sessions s
LEFT JOIN sessions.activations a ON a.session_id = s.id AND a.ended_at IS NULL
WHERE s.org_id = $1 AND s.key = $2 AND s.ended_at IS NULL
"""

#: A session ($1) with its transcript (its current turns, concatenated),
#: whether run $2 is committed, and whether it needs a touch ($3 s).
_TRANSCRIPT_SQL = f"""
SELECT {", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))},
       s.last_active_at < now() - make_interval(secs => $3) AS stale,
       (SELECT string_agg(t.data, ''::bytea ORDER BY t.turn) FROM sessions.turns t
        WHERE t.session_id = s.id AND t.state = 'current') AS transcript,
       (SELECT t.epoch FROM sessions.turns t WHERE t.run_id = $2) AS committed_epoch
FROM sessions.sessions s WHERE s.id = $1
"""

#: The run's session ($1, org $2) locked for its commit, and the turn run $3
#: already has (if any).
_COMMIT_LOCK_SQL = f"""
SELECT {", ".join(f"s.{c.strip()}" for c in _SESSION_COLUMNS.split(","))},
       d.session_id AS done_session_id, d.turn AS done_turn
FROM sessions.sessions s LEFT JOIN sessions.turns d ON d.run_id = $3
WHERE s.id = $1 AND s.org_id = $2
FOR UPDATE OF s
"""

#: A commit's one-statement form (:meth:`SessionStore.commit_run`, the hot
#: path): lock session $1 of org $2, and when it is open, run $3 has no turn
#: yet and the transcript stays within $8 bytes, append the turn (epoch $4,
#: data $5, $6 messages, $7 bytes) and write the outbox event (parameters $9
#: on, ``{outbox}``). No row: one of those conditions failed, and the commit
#: takes the general path, which tells which. In READ COMMITTED the lock
#: returns the row's newest version (a commit that got there first moved
#: head_turn: this one goes after it), and the update finds that version
#: too; a repeat of the same run that committed meanwhile is not in the
#: snapshot, so its turn insert fails on ``turns_run`` and the caller
#: confirms the earlier commit.
_COMMIT_APPEND_SQL = """
WITH cur AS (
    SELECT s.id, s.head_turn, s.transcript_bytes FROM sessions.sessions s
    WHERE s.id = $1 AND s.org_id = $2 AND s.ended_at IS NULL
    FOR UPDATE
), ok AS (
    SELECT cur.id, cur.head_turn FROM cur
    WHERE cur.transcript_bytes + $7 <= $8
      AND NOT EXISTS (SELECT 1 FROM sessions.turns d WHERE d.run_id = $3)
), t AS (
    INSERT INTO sessions.turns (session_id, turn, run_id, epoch, org_id, checkpoint, data,
        message_count, size_bytes)
    SELECT ok.id, ok.head_turn + 1, $3, $4, $2, false, $5, $6, $7 FROM ok
), u AS (
    UPDATE sessions.sessions s
    SET head_turn = ok.head_turn + 1, message_count = s.message_count + $6,
        transcript_bytes = s.transcript_bytes + $7, updated_at = now(), last_active_at = now()
    FROM ok WHERE s.id = ok.id
    RETURNING s.id, s.message_count, ok.head_turn AS base_turn
), ob AS ({outbox})
SELECT u.id, u.message_count, u.base_turn, (SELECT max(pos) FROM ob) AS pos FROM u
"""

#: Sessions whose identity (org, key, agent) :meth:`SessionStore.commit_run`
#: remembers, to build a commit's event without reading the row first. The
#: identity of a session id never changes; an entry takes about 500 bytes,
#: so the whole cache stays under 10 MB.
_IDENTITY_CACHE_SIZE = 16_384


@dataclass(frozen=True, slots=True)
class TranscriptRead:
    """What :meth:`SessionStore.read_transcript` returns.

    ``data`` is the serialized ``Transcript`` (b"" for none); ``session_id``
    is the session it belongs to (the token's, or its compaction successor)
    and ``head_turn`` its committed turns; ``run_committed`` says whether the
    token's run is already committed.
    """

    data: bytes
    session_id: str
    head_turn: int
    run_committed: bool
    #: Epoch at which the token's run committed (None: not committed).
    committed_epoch: int | None = None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`SessionStore.commit_run` returns: the session holding the
    run's turn, its message count, the turn, and the lifecycle events the
    commit wrote (``id`` = outbox position; empty for a repeat)."""

    session_id: str
    message_count: int
    turn: int
    events: list[common_pb2.LifecycleEvent]


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
        session.end_time.FromDatetime(row["ended_at"])
        session.end_reason = _END_REASONS.get(
            row["end_reason"] or "", common_pb2.SESSION_END_REASON_UNSPECIFIED
        )
    return session


def _event(
    type_: str,
    row: db.Row,
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
    row: db.Row,
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
        max_snapshot_bytes: largest transcript (bytes, all turns of a
            session) :meth:`commit_run` lets a session grow to.
        archive_on_reset: keep a reset session's turns as ``archived``
            instead of deleting them.
        touch_interval_s: ``last_active_at`` is refreshed by resolves and
            transcript reads only when older than this (idle expiry and
            pruning work in much longer units), so the hot paths write
            nothing.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        instance_id: str,
        max_snapshot_bytes: int,
        archive_on_reset: bool = False,
        touch_interval_s: float = 1.0,
    ):
        self.pool = pool
        self.instance_id = instance_id
        self.max_snapshot_bytes = max_snapshot_bytes
        self.archive_on_reset = archive_on_reset
        self.touch_interval_s = touch_interval_s
        self.outbox = Outbox("sessions", EVENTS_CHANNEL)
        self._commit_append_sql = _COMMIT_APPEND_SQL.format(
            outbox=self.outbox.insert_sql(9, when="EXISTS (SELECT 1 FROM ok)")
        )
        #: session id -> (org_id, key, agent_id), most recently used last.
        self._identities: collections.OrderedDict[uuid.UUID, tuple[str, str, str]] = collections.OrderedDict()
        #: Called with the events of every committed transaction (in-process hooks).
        self.listeners: list[Callable[[Sequence[common_pb2.LifecycleEvent]], None]] = []

    # ------------------------------------------------------------ outbox

    async def _emit(self, conn: db.Connection, events: Sequence[common_pb2.LifecycleEvent]) -> None:
        """Write ``events`` to the outbox; each gets its position as ``id``."""
        for event, position in zip(events, await self.outbox.emit(conn, events), strict=True):
            event.id = position

    def _written(self, events: Sequence[common_pb2.LifecycleEvent] = ()) -> None:
        """After a commit: hand ``events`` to the in-process listeners (hooks)."""
        if not events:
            return
        for listener in self.listeners:
            try:
                listener(events)
            except Exception:
                log.exception("lifecycle event listener failed")

    async def list_events(
        self, after_id: int, limit: int, types: Sequence[str] = ()
    ) -> list[common_pb2.LifecycleEvent]:
        """Sequenced events with ``pos > after_id``, oldest first."""
        return await self.outbox.read(self.pool, after_id, limit, types)

    # ------------------------------------------------------------ lookups

    async def _find(
        self,
        conn: db.Executor,
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
                raise NotFound(
                    f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id"
                )
            if current_only and row["ended_at"] is not None:
                raise FailedPrecondition(
                    f"session {session_id} has ended ({(row['end_reason'] or '').lower()}); "
                    f"its key now points to {row['next_session_id'] or 'a new session'}",
                    reason="SESSION_ENDED",
                    field="session_id",
                )
            return row
        if not key:
            raise InvalidArgument(
                "session_id or session_key is required", reason="MISSING_FIELD", field="session_key"
            )
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
            raise NotFound(
                f"no session for key {key[:64]!r}", reason="SESSION_NOT_FOUND", field="session_key"
            )
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
        conn: db.Connection,
        row: asyncpg.Record,
        reason: str,
        resumed_from: uuid.UUID | None = None,
    ) -> list[common_pb2.LifecycleEvent]:
        opened = await conn.fetchval(
            """
            INSERT INTO sessions.activations
                (session_id, org_id, instance_id, start_reason, resumed_from_session_id)
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
                    reason=cast(
                        common_pb2.SessionStartReason,
                        common_pb2.SessionStartReason.Value(f"SESSION_START_REASON_{reason}"),
                    ),
                    resumed_from_session_id=str(resumed_from or ""),
                ),
            )
        ]

    async def _close_activation(
        self,
        conn: db.Connection,
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
                merged,
                reason,
                source=self.instance_id,
                next_session_id=next_session_id,
                message_count=message_count,
            )
        ]

    async def _insert_session(
        self,
        conn: db.Connection,
        org_id: str,
        key: str,
        agent_id: str,
        parent_session_id: uuid.UUID | None,
        resumed_from: uuid.UUID | None = None,
    ) -> asyncpg.Record | None:
        return await conn.fetchrow(
            f"""
            INSERT INTO sessions.sessions
                (id, org_id, key, agent_id, parent_session_id, resumed_from_session_id)
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
    ) -> tuple[common_pb2.Session, bool, list[common_pb2.LifecycleEvent]]:
        """:meth:`resolve_with_transcript` without the transcript."""
        session, created, events, _ = await self.resolve_with_transcript(
            org_id, key, agent_id, parent_session_id=parent_session_id, create=create
        )
        return session, created, events

    async def resolve_with_transcript(
        self,
        org_id: str,
        key: str,
        agent_id: str,
        *,
        parent_session_id: uuid.UUID | None = None,
        create: bool = True,
        transcript_max_bytes: int = 0,
    ) -> tuple[common_pb2.Session, bool, list[common_pb2.LifecycleEvent], TranscriptRead | None]:
        """The key's current session, created (session.start NEW) if missing.

        Marks the session active and opens an activation if none is open
        (session.start RESUMED). An open activation whose owner instance is
        dead (its lease lapsed or it stopped without ending it) is ended
        first (session.end CRASH_RECOVERED), so a conversation used again
        before the crash-recovery sweep never keeps a dead activation. When
        the session is current, active and touched within
        ``touch_interval_s``, this is one read-only statement.

        With ``transcript_max_bytes``, the session's transcript comes too
        (as :meth:`read_transcript` would read it for a new run) when it is
        at most that many bytes and the answer took no write (the hot path),
        or the session is new.

        Returns:
            ``(session, created, events, transcript)``: the lifecycle events
            committed, each with its outbox position as ``id``; the
            transcript or None.

        Raises:
            NotFound: no session and ``create`` is False.
            FailedPrecondition: the key's session belongs to another agent
                (reason SESSION_AGENT_MISMATCH).
        """
        row = await self.pool.fetchrow(
            _RESOLVE_SQL, org_id, key, self.touch_interval_s, self.instance_id, transcript_max_bytes
        )
        if row is not None:
            self._check_agent(row, key, agent_id)
            self._remember(row)
            if row["activation_owner"] is not None and not row["orphaned"] and not row["stale"]:
                transcript = None
                if row["transcript"] is not None:
                    transcript = TranscriptRead(
                        bytes(row["transcript"]), str(row["id"]), row["head_turn"], False
                    )
                return session_proto(row), False, [], transcript
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
                events: list[common_pb2.LifecycleEvent] = []
                if row is None:
                    if not create:
                        raise NotFound(
                            "no session for this session_key", reason="SESSION_NOT_FOUND", field="session_key"
                        )
                    row = await self._insert_session(conn, org_id, key, agent_id, parent_session_id)
                    if row is None:
                        continue  # a concurrent caller created it; read it again
                    created = True
                else:
                    self._check_agent(row, key, agent_id)
                    events += await self._recover_orphan(conn, row)
                events += await self._open_activation(conn, row, "NEW" if created else "RESUMED")
                await self._emit(conn, events)
            self._remember(row)
            if events:
                self._written(events)
            transcript = None
            if created and transcript_max_bytes > 0:  # a new session's transcript is empty
                transcript = TranscriptRead(b"", str(row["id"]), 0, False)
            return session_proto(row), created, events, transcript
        raise FailedPrecondition(
            "the session key is contended; retry",
            reason="SESSION_CONTENDED",
            field="session_key",
            retryable=True,
        )

    def _remember(self, row: db.Row) -> None:
        """Note the identity of session ``row`` (id, org_id, key, agent_id)
        for :meth:`commit_run`'s one-statement path."""
        identities = self._identities
        identities[row["id"]] = (row["org_id"], row["key"], row["agent_id"])
        identities.move_to_end(row["id"])
        if len(identities) > _IDENTITY_CACHE_SIZE:
            identities.popitem(last=False)

    @staticmethod
    def _check_agent(row: asyncpg.Record, key: str, agent_id: str) -> None:
        if agent_id and row["agent_id"] != agent_id:
            raise FailedPrecondition(
                f"the session key belongs to agent {row['agent_id']!r}, not {agent_id!r}",
                reason="SESSION_AGENT_MISMATCH",
                field="agent_id",
            )

    async def _recover_orphan(
        self, conn: db.Connection, row: asyncpg.Record
    ) -> list[common_pb2.LifecycleEvent]:
        """End the session's open activation if its owner is dead
        (session.end CRASH_RECOVERED); the session row is locked."""
        ended = await conn.fetchrow(
            """
            UPDATE sessions.activations a SET ended_at = now(), end_reason = 'CRASH_RECOVERED'
            WHERE a.session_id = $1 AND a.ended_at IS NULL AND a.instance_id <> $2
              AND NOT EXISTS (SELECT 1 FROM sessions.instances i
                              WHERE i.instance_id = a.instance_id AND i.stopped_at IS NULL
                                AND i.lease_expires_at > now())
            RETURNING started_at, ended_at
            """,
            row["id"],
            self.instance_id,
        )
        if ended is None:
            return []
        metrics.SESSION_ENDS_TOTAL.labels("CRASH_RECOVERED").inc()
        merged = {**dict(row), "started_at": ended["started_at"], "ended_at": ended["ended_at"]}
        return [_end_event(merged, "CRASH_RECOVERED", source=self.instance_id)]

    async def reset(
        self, org_id: str, session_id: uuid.UUID | None, key: str
    ) -> tuple[common_pb2.Session, str]:
        """Roll the key over to a new, empty session.

        The old session ends (session.end RESET with next_session_id) and its
        transcript is purged (or archived); a new session starts (NEW).

        Returns:
            ``(new session, previous session id)``.

        Raises:
            NotFound: no such session. FailedPrecondition: it has already ended.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            old = await self._find(conn, org_id, session_id, key, for_update=True, current_only=True)
            await conn.execute(
                "UPDATE sessions.sessions SET ended_at = now(), end_reason = 'RESET', updated_at = now() "
                "WHERE id = $1",
                old["id"],
            )
            new = await self._insert_session(
                conn, org_id, old["key"], old["agent_id"], old["parent_session_id"]
            )
            assert new is not None  # the old row ended in this transaction
            await conn.execute(
                "UPDATE sessions.sessions SET next_session_id = $2 WHERE id = $1", old["id"], new["id"]
            )
            # The transcript being forgotten lives in this session and in the
            # compaction predecessors it continued: none of it is served again.
            purged = [r["id"] for r in await conn.fetch(_PREDECESSORS_SQL, old["id"])]
            if self.archive_on_reset:
                await conn.execute(
                    "UPDATE sessions.turns SET state = 'archived' "
                    "WHERE session_id = ANY($1::uuid[]) AND state = 'current'",
                    purged,
                )
            else:
                await conn.execute("DELETE FROM sessions.turns WHERE session_id = ANY($1::uuid[])", purged)
            events = await self._close_activation(conn, old, "RESET", next_session_id=new["id"])
            events += await self._open_activation(conn, new, "NEW")
            await self._emit(conn, events)
        self._written(events)
        return session_proto(new), str(old["id"])

    async def delete(self, org_id: str, session_id: uuid.UUID | None, key: str) -> str:
        """Delete a session and its transcript (session.end DELETED).

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

    # Below this method, `list` in the class body names it: annotations say builtins.list.
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

    # ------------------------------------------------------------ transcripts

    async def _follow(self, conn: db.Executor, session_id: uuid.UUID) -> builtins.list[uuid.UUID]:
        """``session_id`` and its compaction successors, in order (the last is current)."""
        return [r["id"] for r in await conn.fetch(_CHAIN_SQL, session_id)]

    def _check_token(self, claims: RunClaims, session_id: str, row: asyncpg.Record | None) -> asyncpg.Record:
        """The token's session row, checked against the token's scope.

        Raises:
            PermissionDenied: ``session_id`` is not the token's session, or
                the token's agent is not the session's (TOKEN_SCOPE_MISMATCH).
            NotFound: no such session in the token's org.
        """
        if session_id and session_id != claims.session_id:
            raise PermissionDenied(
                "run token is not scoped to this session", reason="TOKEN_SCOPE_MISMATCH", field="session_id"
            )
        if row is None or row["org_id"] != claims.org_id:
            raise NotFound(f"session {claims.session_id} not found", reason="SESSION_NOT_FOUND")
        if row["agent_id"] != claims.agent_id:
            raise PermissionDenied(
                "run token is not scoped to this session's agent", reason="TOKEN_SCOPE_MISMATCH"
            )
        return row

    async def read_transcript(self, claims: RunClaims, session_id: str = "") -> TranscriptRead:
        """The transcript of the token's conversation (read when a run starts).

        The conversation continues in the token's session, or in the session
        a compaction rolled it over to. Marks the session active (at most
        once per ``touch_interval_s``), so idle expiry leaves it alone. One
        read-only statement on the hot path.

        Raises:
            PermissionDenied, NotFound: see :meth:`_check_token`.
            FailedPrecondition: the conversation has ended (reset, deleted...).
        """
        run_id = uuid.UUID(claims.run_id)
        row = await self.pool.fetchrow(
            _TRANSCRIPT_SQL, uuid.UUID(claims.session_id), run_id, self.touch_interval_s
        )
        row = self._check_token(claims, session_id, row)
        if row["end_reason"] == "COMPACTION":
            chain = await self._follow(self.pool, row["id"])
            if chain and chain[-1] != row["id"]:
                row = (
                    await self.pool.fetchrow(_TRANSCRIPT_SQL, chain[-1], run_id, self.touch_interval_s) or row
                )
        if row["ended_at"] is not None:
            raise FailedPrecondition(
                f"session {claims.session_id} has ended ({(row['end_reason'] or '').lower()})",
                reason="SESSION_ENDED",
            )
        if row["stale"]:
            await self.pool.execute(
                "UPDATE sessions.sessions SET last_active_at = now() WHERE id = $1", row["id"]
            )
        committed = row["committed_epoch"]
        return TranscriptRead(
            bytes(row["transcript"] or b""),
            str(row["id"]),
            row["head_turn"],
            committed is not None,
            committed,
        )

    def _check_size(self, size: int) -> None:
        if size > self.max_snapshot_bytes:
            raise ResourceExhausted(
                f"the transcript would be {size} bytes; the limit is {self.max_snapshot_bytes} "
                "(sessions.max_snapshot_bytes)",
                reason="SNAPSHOT_TOO_LARGE",
                field="transcript",
                retryable=False,
            )

    async def commit_run(
        self,
        org_id: str,
        session_id: uuid.UUID,
        run_id: uuid.UUID,
        epoch: int,
        append: sessions_pb2.TranscriptAppend,
    ) -> CommitResult:
        """Append a completed run's messages to its conversation (its commit).

        Idempotent per run: a run has at most one turn, ever, so a repeat
        (even of another epoch: the gateway only commits the epoch it holds,
        and a re-executed run that finds its commit reports the stored
        answer) returns the existing commit with no events. ``session_id``
        is the run's session; the turn lands in its current compaction
        successor. If another run committed after this run read its
        transcript (``append.base``), this run's messages are appended after
        it (nothing is lost) and a compaction is skipped. A compaction
        (``append.compaction``) rolls the key over: session.end COMPACTION
        on the old session, session.start RESUMED and session.compacted on
        the new one, which starts with the summary and the kept messages.

        Raises:
            NotFound: the session is gone (SESSION_NOT_FOUND).
            FailedPrecondition: the conversation ended (SESSION_ENDED).
            ResourceExhausted: the transcript would exceed
                ``max_snapshot_bytes`` (SNAPSHOT_TOO_LARGE).
        """
        try:
            return await self._commit_run(org_id, session_id, run_id, epoch, append)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "turns_run":
                raise
            # A concurrent repeat of this commit got there first (its turn was
            # not in our snapshot when we took the lock): confirm it.
            return await self._commit_run(org_id, session_id, run_id, epoch, append)

    async def _commit_run(
        self,
        org_id: str,
        session_id: uuid.UUID,
        run_id: uuid.UUID,
        epoch: int,
        append: sessions_pb2.TranscriptAppend,
    ) -> CommitResult:
        if append.messages and not append.HasField("compaction"):
            identity = self._identities.get(session_id)
            if identity is not None and identity[0] == org_id:
                appended = await self._commit_appended(session_id, identity, run_id, epoch, append)
                if appended is not None:
                    return appended
        events: list[common_pb2.LifecycleEvent] = []
        async with self.pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(_COMMIT_LOCK_SQL, session_id, org_id, run_id)
            if current is None:
                raise NotFound(
                    f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id"
                )
            if current["done_session_id"] is not None:
                return await self._committed(conn, current["done_session_id"], current["done_turn"])
            if not append.messages:
                raise InvalidArgument(
                    f"run {run_id} has no messages to commit and no earlier commit",
                    reason="NOTHING_TO_COMMIT",
                    field="append.messages",
                )
            for _ in range(3):
                if current["end_reason"] != "COMPACTION":
                    break
                # The conversation goes on in a compaction successor: follow
                # the chain (again, if a concurrent compaction rolled it over
                # while we waited for the lock).
                chain = await self._follow(conn, current["id"])
                current = await conn.fetchrow(_COMMIT_LOCK_SQL, chain[-1], org_id, run_id) if chain else None
                if current is None:
                    raise NotFound(
                        f"session {session_id} not found", reason="SESSION_NOT_FOUND", field="session_id"
                    )
            self._remember(current)
            if current["ended_at"] is not None:
                raise FailedPrecondition(
                    f"session {session_id} has ended ({(current['end_reason'] or '').lower()}); "
                    "the run's result is discarded",
                    reason="SESSION_ENDED",
                )
            stale = (
                append.base.session_id != str(current["id"]) or append.base.head_turn != current["head_turn"]
            )
            if stale and append.base.session_id:
                log.info(
                    "run %s committed after another commit in session %s: its %d message(s) go after it",
                    run_id,
                    current["id"],
                    len(append.messages),
                )
            if append.HasField("compaction") and not stale:
                target, turn, count, events = await self._roll_over(conn, current, run_id, epoch, append)
            else:
                transcript = common_pb2.Transcript(messages=append.messages)
                target, turn, count, events = await self._append_turn(
                    conn, current, run_id, epoch, transcript, emit=True
                )
            await self._emit(conn, [event for event in events if not event.id])
        self._written(events)
        return CommitResult(str(target), count, turn, events)

    async def _commit_appended(
        self,
        session_id: uuid.UUID,
        identity: tuple[str, str, str],
        run_id: uuid.UUID,
        epoch: int,
        append: sessions_pb2.TranscriptAppend,
    ) -> CommitResult | None:
        """The hot path of :meth:`commit_run`: append the run's messages to
        its open session in one statement (one round trip, no explicit
        transaction). None when the session is not open, the run has a turn
        already, or the transcript would be too large: the general path
        then decides (and raises the error, if any)."""
        org_id, key, agent_id = identity
        transcript = common_pb2.Transcript(messages=append.messages)
        data = transcript.SerializeToString(deterministic=True)
        event = _event(
            "session.updated",
            {"id": session_id, "org_id": org_id, "key": key, "agent_id": agent_id},
            source=self.instance_id,
        )
        event.run_id = str(run_id)
        row = await self.pool.fetchrow(
            self._commit_append_sql,
            session_id,
            org_id,
            run_id,
            epoch,
            data,
            len(transcript.messages),
            len(data),
            self.max_snapshot_bytes,
            *self.outbox.emit_args([event]),
        )
        if row is None:
            return None
        metrics.SNAPSHOT_BYTES.observe(len(data))
        event.id = row["pos"]
        if append.base.session_id and (
            append.base.session_id != str(session_id) or append.base.head_turn != row["base_turn"]
        ):
            log.info(
                "run %s committed after another commit in session %s: its %d message(s) go after it",
                run_id,
                session_id,
                len(append.messages),
            )
        events = [event]
        self._written(events)
        return CommitResult(str(row["id"]), row["message_count"], row["base_turn"] + 1, events)

    async def _append_turn(
        self,
        conn: db.Connection,
        current: asyncpg.Record,
        run_id: uuid.UUID,
        epoch: int,
        transcript: common_pb2.Transcript,
        *,
        checkpoint: bool = False,
        emit: bool = False,
    ) -> tuple[uuid.UUID, int, int, builtins.list[common_pb2.LifecycleEvent]]:
        """Add ``transcript`` as the next turn of the locked session
        ``current``; returns (session id, turn, message count, events).

        The one event is ``session.updated``; with ``emit`` it is written to
        the outbox by the same statement (one round trip less per commit)
        and has its position as ``id``; without, the caller emits it (after
        events that must come first)."""
        data = transcript.SerializeToString(deterministic=True)
        self._check_size(current["transcript_bytes"] + len(data))
        turn = current["head_turn"] + 1
        # The event names only the session (id, org, key, agent), which the
        # update does not change: it can be built, and stored, with it.
        event = _event("session.updated", current, source=self.instance_id)
        event.run_id = str(run_id)
        outbox = f", ob AS ({self.outbox.insert_sql(10)})" if emit else ""
        updated = db.returned(
            await conn.fetchrow(
                f"""
            WITH t AS (
                INSERT INTO sessions.turns (session_id, turn, run_id, epoch, org_id, checkpoint, data,
                    message_count, size_bytes)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
            ), u AS (
                UPDATE sessions.sessions
                SET head_turn = $2, message_count = message_count + $8,
                    transcript_bytes = transcript_bytes + $9, updated_at = now(), last_active_at = now()
                WHERE id = $1 RETURNING id, message_count
            ){outbox}
            SELECT u.id, u.message_count{", (SELECT max(pos) FROM ob) AS pos" if emit else ""} FROM u
            """,
                current["id"],
                turn,
                run_id,
                epoch,
                current["org_id"],
                checkpoint,
                data,
                len(transcript.messages),
                len(data),
                *(self.outbox.emit_args([event]) if emit else ()),
            )
        )
        metrics.SNAPSHOT_BYTES.observe(len(data))
        if emit:
            event.id = updated["pos"]
        return updated["id"], turn, updated["message_count"], [event]

    @staticmethod
    async def _committed(conn: db.Connection, session_id: uuid.UUID, turn: int) -> CommitResult:
        """:meth:`commit_run`'s answer for a run committed before."""
        count = await conn.fetchval("SELECT message_count FROM sessions.sessions WHERE id = $1", session_id)
        return CommitResult(str(session_id), int(count or 0), int(turn), [])

    async def _roll_over(
        self,
        conn: db.Connection,
        current: asyncpg.Record,
        run_id: uuid.UUID,
        epoch: int,
        append: sessions_pb2.TranscriptAppend,
    ) -> tuple[uuid.UUID, int, int, builtins.list[common_pb2.LifecycleEvent]]:
        """Compaction: end ``current``, start its successor with a checkpoint
        turn (summary, kept messages, the run's messages). Returns (new
        session id, turn, message count, events)."""
        compaction = append.compaction
        info = compaction.info
        await conn.execute(
            "UPDATE sessions.sessions SET ended_at = now(), end_reason = 'COMPACTION', updated_at = now() "
            "WHERE id = $1",
            current["id"],
        )
        new = await self._insert_session(
            conn,
            current["org_id"],
            current["key"],
            current["agent_id"],
            current["parent_session_id"],
            current["id"],
        )
        assert new is not None  # the key's current session ended in this transaction
        await conn.execute(
            "UPDATE sessions.sessions SET next_session_id = $2 WHERE id = $1", current["id"], new["id"]
        )
        transcript = common_pb2.Transcript(
            summary=compaction.summary, resumed_from_session_id=str(current["id"])
        )
        transcript.messages.extend(compaction.kept)
        transcript.messages.extend(append.messages)
        target, turn, count, updated = await self._append_turn(
            conn, new, run_id, epoch, transcript, checkpoint=True
        )
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
        events += updated
        metrics.COMPACTIONS_TOTAL.labels("rolled_over").inc()
        log.info(
            "session %s (%s) compacted: %d message(s) summarised, %d kept; key now at session %s",
            current["id"],
            current["key"],
            info.summarized_message_count,
            info.kept_message_count,
            new["id"],
        )
        return target, turn, count, events

    async def head_transcript(
        self, org_id: str, session_id: uuid.UUID | None, key: str
    ) -> tuple[asyncpg.Record, bytes]:
        """The session row and its transcript bytes (b"" if none)."""
        async with self.pool.acquire() as conn:
            row = await self._find(conn, org_id, session_id, key)
            if row["head_turn"] == 0:
                return row, b""
            data = await conn.fetchval(
                "SELECT string_agg(data, ''::bytea ORDER BY turn) FROM sessions.turns "
                "WHERE session_id = $1 AND state = 'current'",
                row["id"],
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
        hold: builtins.list[common_pb2.LifecycleEvent] | None = None,
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
        ended = await self._end_activations(
            reason, "a.instance_id = $3", [self.instance_id], batch=batch, hold=held
        )
        metrics.ACTIVE_SESSIONS.set(0)
        self._written(held)
        return ended

    async def stop_instance(self, mode: str) -> None:
        """Mark this instance stopped (its lease ends now); emits ``service.shutdown``."""
        event = self._service_event("service.shutdown", mode)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE sessions.instances SET stopped_at = now(), lease_expires_at = now(), "
                "shutdown_mode = $2 "
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
                   WHERE i.instance_id = a.instance_id AND i.stopped_at IS NULL
                     AND i.lease_expires_at > now())""",
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
