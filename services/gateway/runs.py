"""The runs queue in PostgreSQL (schema ``gateway``).

* Insert with an idempotency key: a repeat returns the existing run. When
  the session has no active run and this gateway has a worker with room, the
  run is inserted already claimed for it (one transaction instead of two).
* At most one running run per session (partial unique index), counting a
  run that waits for client tool results (``requires_action``, see
  :mod:`runyard.gateway.tool_results`); queued runs of a session run in
  arrival order, behind such a run too.
* Claims use ``FOR UPDATE SKIP LOCKED`` (several runs per statement, one per
  free worker slot), bump the run's ``epoch`` and set a lease that worker
  heartbeats renew; a lapsed lease re-queues the run (attempts are counted
  and capped, then the run fails).
* Run events are stored as chunks (``seq .. last_seq`` per row, see
  :mod:`runyard.gateway.events`); every write of a chunk checks the run's
  epoch and ``last_seq`` it follows, so a retried write stores nothing twice
  and a gateway that lost the run writes nothing.
* The statement that ends a run writes its last events, its terminal event
  and its lifecycle events (outbox), so a run never ends without them.
* NOTIFY ``runyard_runs`` wakes dispatchers; ``runyard_run_events`` carries
  ``run_id:last_seq`` for followers on other gateways; ``runyard_run_cancel``
  carries ``run_id:epoch:gateway_id`` for the gateway holding the worker.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import asyncpg

from runyard._proto.v1 import common_pb2
from runyard.common import db, metrics
from runyard.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from runyard.common.pagination import decode_time_cursor, page_size, time_cursor_page
from runyard.common.protoutil import now, timestamp
from runyard.gateway.run_status import TO_PROTO, RunStatus
from runyard.gateway.tool_events import tool_lifecycle
from runyard.gateway.watch import OUTBOX, emit_run_events, fetch_with_events, run_events

__all__ = [
    "CANCEL_CHANNEL",
    "EVENTS_CHANNEL",
    "FILLER_EVENT",
    "QUEUE_CHANNEL",
    "Claim",
    "EventChunk",
    "RunStore",
    "decode_batch",
    "encode_batch",
    "event_bytes",
    "request_hash",
]

QUEUE_CHANNEL = "runyard_runs"
EVENTS_CHANNEL = "runyard_run_events"
CANCEL_CHANNEL = "runyard_run_cancel"

_STRATEGY_NAMES = {
    value: name.removeprefix("MULTITASK_STRATEGY_") for name, value in common_pb2.MultitaskStrategy.items()
}
# items() is typed with plain ints in protobuf's stubs.
_STRATEGY_VALUES = cast(
    "dict[str, common_pb2.MultitaskStrategy]", {name: value for value, name in _STRATEGY_NAMES.items()}
)

_RUN_COLUMNS = (
    "id, org_id, session_id, session_key, agent_id, status, input_text, metadata, idempotency_key, "
    "multitask_strategy, attempt, epoch, worker_id, gateway_id, cancel_requested, last_seq, model, "
    "input_tokens, output_tokens, error, task_id, created_at, started_at, ended_at, first_claimed_at"
)

#: What the requeue of a lapsed run writes for each seq a dead gateway may
#: have delivered from memory (events.PUBLISH_WINDOW): an empty delta, which
#: clients append as nothing; the next attempt's ``started`` follows.
FILLER_EVENT = common_pb2.RunEvent(text_delta=common_pb2.TextDelta()).SerializeToString()


def event_bytes(**event: Any) -> bytes:
    """Serialized ``RunEvent`` with one oneof member set and the current time."""
    message = common_pb2.RunEvent(time=now(), **event)
    return message.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_batch(raws: Iterable[bytes]) -> bytes:
    """``RunEventBatch`` bytes from serialized events, without re-encoding
    them (field 1, length-delimited: the protobuf encoding of ``repeated
    RunEvent events = 1``)."""
    return b"".join(b"\x0a" + _varint(len(raw)) + raw for raw in raws)


def decode_batch(
    run_id: uuid.UUID, session_id: str, first_seq: int, data: bytes
) -> list[common_pb2.RunEvent]:
    """The events of a stored chunk with their ids and seqs filled in."""
    events = list(common_pb2.RunEventBatch.FromString(data).events)
    for offset, event in enumerate(events):
        event.run_id = str(run_id)
        event.session_id = session_id
        event.seq = first_seq + offset
    return events


@dataclass(frozen=True, slots=True)
class EventChunk:
    """Consecutive events of one run epoch to store (``first_seq`` must
    follow the run's stored ``last_seq``); ``data`` is a ``RunEventBatch``,
    ``worker_seq`` the worker's counter of the last one."""

    run_id: uuid.UUID
    epoch: int
    first_seq: int
    last_seq: int
    data: bytes
    worker_seq: int
    #: Lifecycle events of these events (tool.called, tool.completed),
    #: written with the chunk, only if the chunk is.
    lifecycle: tuple[common_pb2.LifecycleEvent, ...] = ()


_WRITE_EVENTS_SQL = f"""
WITH b AS (
    SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bytea[], $6::bigint[])
        AS b(run_id, epoch, first_seq, last_seq, data, wseq)
), upd AS (
    UPDATE gateway.runs r SET last_seq = b.last_seq, worker_seq = b.wseq
    FROM b
    WHERE r.id = b.run_id AND r.epoch = b.epoch AND r.status = 'running' AND r.last_seq = b.first_seq - 1
    RETURNING r.id, r.last_seq
), ins AS (
    INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
    SELECT b.run_id, b.first_seq, b.last_seq, b.data FROM b JOIN upd ON upd.id = b.run_id
    RETURNING run_id
), n AS (
    SELECT pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last_seq) FROM upd
)
SELECT b.run_id, upd.id IS NOT NULL AS written,
       (r.epoch = b.epoch AND r.last_seq >= b.last_seq) AS already, (SELECT count(*) FROM n) AS notified
FROM b LEFT JOIN upd ON upd.id = b.run_id LEFT JOIN gateway.runs r ON r.id = b.run_id
"""


#: :data:`_WRITE_EVENTS_SQL` that also writes the chunks' lifecycle events
#: (``EventChunk.lifecycle``: tool.called, tool.completed), each only if its
#: run's chunk is written ($13: the run of each event), so they are written
#: exactly once, with their run events.
_WRITE_EVENTS_WITH_LIFECYCLE_SQL = _WRITE_EVENTS_SQL.replace(
    "\n), n AS (",
    f"\n), ob AS ({OUTBOX.insert_sql(7, when='($13::uuid[])[u.n] IN (SELECT id FROM upd)')}\n), n AS (",
)
assert _WRITE_EVENTS_WITH_LIFECYCLE_SQL.count("ob AS (") == 1


def request_hash(request: Any) -> bytes:
    """Fingerprint of a SendMessage request (idempotent repeats must match it)."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


@dataclass(frozen=True, slots=True)
class Claim:
    """A run claimed for a worker; ``row`` has what its lifecycle events need
    (see :func:`runyard.gateway.watch.run_events`)."""

    run_id: uuid.UUID
    org_id: str
    session_id: uuid.UUID
    agent_id: str
    payload: bytes
    epoch: int
    attempt: int
    created_at: dt.datetime
    first_claim: bool
    last_seq: int
    worker_id: str
    row: dict[str, Any]
    #: A run that continues after client tool results: its RunContinuation bytes.
    continuation: bytes | None = None

    @classmethod
    def from_row(cls, row: db.Row) -> Claim:
        return cls(
            run_id=row["id"],
            org_id=row["org_id"],
            session_id=row["session_id"],
            agent_id=row["agent_id"],
            payload=bytes(row["payload"]),
            epoch=row["epoch"],
            attempt=row["attempt"],
            created_at=row["created_at"],
            first_claim=row["first_claimed_at"] == row["started_at"],
            last_seq=row["last_seq"],
            worker_id=row["worker_id"] or "",
            row={k: row[k] for k in _INFO_COLUMNS},
            continuation=bytes(row.get("continuation") or b"") or None,
        )


#: Columns a run's lifecycle events are built from (kept with its claim).
_INFO_COLUMNS = (
    "id",
    "org_id",
    "session_id",
    "session_key",
    "agent_id",
    "task_id",
    "input_text",
    "attempt",
    "created_at",
    "first_claimed_at",
    "started_at",
)


def run_proto(row: asyncpg.Record) -> common_pb2.Run:
    """A ``Run`` message from a ``gateway.runs`` row."""
    run = common_pb2.Run(
        id=str(row["id"]),
        session_id=str(row["session_id"]),
        session_key=row["session_key"],
        agent_id=row["agent_id"],
        status=TO_PROTO[row["status"]],
        create_time=timestamp(row["created_at"]),
        attempt=row["attempt"],
        idempotency_key=row["idempotency_key"] or "",
        model=row["model"] or "",
        usage=common_pb2.Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]),
        last_seq=row["last_seq"],
        input_text=row["input_text"],
        metadata=json.loads(row["metadata"])
        if isinstance(row["metadata"], str)
        else dict(row["metadata"] or {}),
        multitask_strategy=_STRATEGY_VALUES.get(
            row["multitask_strategy"], common_pb2.MULTITASK_STRATEGY_UNSPECIFIED
        ),
        task_id=str(row["task_id"] or ""),
    )
    if row["started_at"] is not None:
        run.start_time.FromDatetime(row["started_at"])
    if row["ended_at"] is not None:
        run.end_time.FromDatetime(row["ended_at"])
    if row["error"] is not None:
        run.error.ParseFromString(row["error"])
    return run


def _idempotency_lock(payload: common_pb2.RunPayload) -> str:
    """The advisory lock name serializing inserts with ``payload``'s idempotency key."""
    return f"runyard.idem:{payload.org_id}:{payload.idempotency_key}"


def _insert_sql(*, if_idle: bool) -> str:
    """The statement of :meth:`RunStore._insert_row`: the run row, its seq-1
    event (``$13``) and its lifecycle events (outbox, from ``$18``); with
    ``if_idle`` only when ``gateway.lock_idle_session`` finds the session
    idle (the idempotency lock name is the last parameter)."""
    lock_param = 18 + OUTBOX.arg_count
    idle_cte = (
        f"idle AS MATERIALIZED (SELECT gateway.lock_idle_session($3, $2, $9, ${lock_param}) AS last_turn), "
        if if_idle
        else ""
    )
    return f"""
        WITH {idle_cte}ins AS (
            INSERT INTO gateway.runs (id, org_id, session_id, session_key, agent_id, status, payload,
                input_text, metadata, idempotency_key, request_hash, multitask_strategy, max_attempts,
                last_seq, task_id, epoch, attempt, worker_id, gateway_id, lease_expires_at, started_at,
                first_claimed_at, created_at)
            SELECT $1, $2, $3, $4, $5, CASE WHEN $15::text IS NULL THEN 'queued' ELSE 'running' END,
                $6, $7, $8::jsonb, $9, $10, $11, $12, 1, $14,
                CASE WHEN $15::text IS NULL THEN 0 ELSE 1 END,
                CASE WHEN $15::text IS NULL THEN 0 ELSE 1 END,
                $15, CASE WHEN $15::text IS NULL THEN NULL ELSE $16 END,
                CASE WHEN $15::text IS NULL THEN NULL ELSE now() + make_interval(secs => $17) END,
                CASE WHEN $15::text IS NULL THEN NULL ELSE now() END,
                CASE WHEN $15::text IS NULL THEN NULL ELSE now() END, now()
            {"FROM idle WHERE idle.last_turn IS NOT NULL" if if_idle else ""}
            RETURNING {_RUN_COLUMNS}, payload
        ), ev AS (
            INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
            SELECT id, 1, 1, $13 FROM ins
        ), ob AS ({OUTBOX.insert_sql(18, when="EXISTS (SELECT 1 FROM ins)" if if_idle else "")})
        SELECT ins.*, {"idle.last_turn" if if_idle else "NULL::integer AS last_turn"},
            CASE WHEN $15::text IS NULL THEN pg_notify('{QUEUE_CHANNEL}', '') END AS notified
        FROM ins{", idle" if if_idle else ""}
    """


_INSERT_SQL = _insert_sql(if_idle=False)
_INSERT_IF_IDLE_SQL = _insert_sql(if_idle=True)


class RunStore:
    """SQL for the runs queue and run events.

    Args:
        pool: asyncpg pool on the database holding the ``gateway`` schema.
        gateway_id: this gateway instance.
        lease_s: run lease length in seconds.
        max_attempts: executions of a run before it fails.
        max_queued_per_session: active (queued + running) runs a session may have.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        gateway_id: str,
        lease_s: float,
        max_attempts: int,
        max_queued_per_session: int,
    ):
        self.pool = pool
        self.gateway_id = gateway_id
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.max_queued_per_session = max_queued_per_session

    # ------------------------------------------------------------ insert

    async def find_idempotent(self, org_id: str, key: str) -> asyncpg.Record | None:
        """The run created with idempotency key ``key`` in this org, if any."""
        return await self.pool.fetchrow(
            f"SELECT {_RUN_COLUMNS}, request_hash FROM gateway.runs "
            "WHERE org_id = $1 AND idempotency_key = $2",
            org_id,
            key,
        )

    async def insert(
        self,
        payload: common_pb2.RunPayload,
        *,
        fingerprint: bytes,
        strategy: str,
        conn: db.Connection | None = None,
        claim_for: str | None = None,
        relayed: Sequence[common_pb2.LifecycleEvent] = (),
    ) -> tuple[db.Row, bool]:
        """Queue a run (its ``queued`` event is seq 1).

        With ``conn`` (a connection inside a transaction) the run is queued in
        that transaction (a savepoint), so it commits or rolls back with the
        caller's other changes (background tasks start their runs this way).

        ``strategy`` applies when the session already has an active run:
        ENQUEUE queues behind it; REJECT refuses; INTERRUPT asks the active
        runs to cancel and queues behind them; COLLECT merges the text into a
        queued COLLECT follow-up run when one exists.

        Without ``conn``, a message for an idle session with a new (or no)
        idempotency key is queued in one statement (see :meth:`_insert_row`,
        ``if_idle``); anything else takes the general path below.

        With ``claim_for`` (a worker connected to this gateway with a free
        slot) a run whose session has no active run is inserted already
        claimed for that worker (status ``running``, epoch 1), in the same
        statement; the caller assigns it (:meth:`Claim.from_row`).
        ``relayed`` are the sessions service's lifecycle events of the
        session's resolution (``id`` = their sessions outbox position),
        recorded before the run's own.

        Returns:
            ``(run row, created)``; ``created`` is False when an idempotent
            repeat or a COLLECT merge returned an existing run. A created row
            also has ``queued_event`` (the serialized seq-1 event),
            ``last_turn`` (the transcript turn the session's last completed
            run committed; 0 if unknown) and, when claimed, ``payload``.

        Raises:
            FailedPrecondition: REJECT while a run is active (reason
                SESSION_BUSY, metadata ``active_run_id``).
            ResourceExhausted: too many active runs on the session.
            InvalidArgument: idempotency key reused with a different request.
        """
        session_id = uuid.UUID(payload.session_id)
        key = payload.idempotency_key or None
        if conn is None:
            # The common case, an idle session and a new key: one statement.
            queued = event_bytes(queued=common_pb2.RunQueued(position=0))
            row = await self._insert_row(
                self.pool, payload, fingerprint, strategy, queued, claim_for, relayed, if_idle=True
            )
            if row is not None:
                return {**dict(row), "queued_event": queued}, True
        connection = contextlib.nullcontext(conn) if conn is not None else self.pool.acquire()
        async with connection as conn, conn.transaction():
            # Serialize inserts per idempotency key (a repeat may name another
            # session), then per session; always in this order, so two inserts
            # never wait on each other crosswise. Transaction-scoped locks are
            # safe with pooled connections. (gateway.lock_idle_session takes
            # the same locks in the same order.)
            if key is not None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", _idempotency_lock(payload)
                )
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", str(session_id))
            if key is not None:
                existing = await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS}, request_hash FROM gateway.runs "
                    "WHERE org_id = $1 AND idempotency_key = $2",
                    payload.org_id,
                    key,
                )
                if existing is not None:
                    self._check_fingerprint(existing, fingerprint)
                    return existing, False
            # The session's active runs, and the transcript turn its last
            # completed run committed (whether a transcript read earlier is current).
            rows = await conn.fetch(
                """
                SELECT lt.last_turn, a.id, a.status, a.multitask_strategy, a.payload
                FROM (SELECT (SELECT c.transcript_turn FROM gateway.runs c
                              WHERE c.session_id = $1 AND c.status = 'completed'
                              ORDER BY c.created_at DESC LIMIT 1) AS last_turn) lt
                LEFT JOIN LATERAL (
                    SELECT id, status, multitask_strategy, payload, queue_pos FROM gateway.runs
                    WHERE session_id = $1 AND status IN ('queued', 'running', 'requires_action')
                ) a ON true
                ORDER BY a.queue_pos
                """,
                session_id,
            )
            active = [r for r in rows if r["id"] is not None]
            last_turn = rows[0]["last_turn"] if rows else None
            if active:
                if strategy == "REJECT":
                    raise FailedPrecondition(
                        f"session has an active run {active[0]['id']} ({active[0]['status']}); "
                        "multitask_strategy REJECT refuses new messages until it ends",
                        reason="SESSION_BUSY",
                        metadata={"active_run_id": str(active[0]["id"])},
                    )
                if strategy == "COLLECT":
                    follow_up = next(
                        (
                            r
                            for r in active
                            if r["status"] == RunStatus.QUEUED and r["multitask_strategy"] == "COLLECT"
                        ),
                        None,
                    )
                    merged = None
                    if follow_up is not None:
                        merged = await self._collect_into(conn, follow_up, payload)
                    if merged is not None:
                        await emit_run_events(
                            conn,
                            [merged],
                            source=self.gateway_id,
                            only=["message.received"],
                            message_length=len(payload.input.text),
                        )  # lifecycle event
                        return merged, False
                if strategy == "INTERRUPT":
                    await self._interrupt(conn, [r["id"] for r in active])
                elif len(active) >= self.max_queued_per_session:
                    raise ResourceExhausted(
                        f"session already has {len(active)} active runs "
                        f"(gateway.max_queued_runs_per_session = {self.max_queued_per_session})",
                        reason="SESSION_QUEUE_FULL",
                        retry_after_s=1.0,
                    )
            position = sum(1 for r in active if strategy != "INTERRUPT")
            queued = event_bytes(queued=common_pb2.RunQueued(position=position))
            # Claimed at once only when the session has no active run: every
            # insert of the session holds its lock, and dispatchers only claim
            # queued runs, so no other run of it can start meanwhile.
            claimed = claim_for if not active else None
            row = await self._insert_row(conn, payload, fingerprint, strategy, queued, claimed, relayed)
            return {**dict(db.returned(row)), "queued_event": queued, "last_turn": last_turn or 0}, True

    async def _insert_row(
        self,
        conn: db.Executor,
        payload: common_pb2.RunPayload,
        fingerprint: bytes,
        strategy: str,
        queued: bytes,
        claim_for: str | None,
        relayed: Sequence[common_pb2.LifecycleEvent],
        *,
        if_idle: bool = False,
    ) -> asyncpg.Record | None:
        """One statement: the run row (queued, or running for ``claim_for``),
        its seq-1 event and its lifecycle events.

        With ``if_idle`` (``conn`` outside a transaction) the statement first
        takes the insert's locks and inserts only if the session has no
        active run and the idempotency key is new
        (``gateway.lock_idle_session``, migration 0009); it returns None
        otherwise, having written nothing. Its row then also has
        ``last_turn`` (see :meth:`insert`).
        """
        run_id = uuid.UUID(payload.run_id)
        stamp = dt.datetime.now(dt.UTC)
        info = {
            "id": run_id,
            "org_id": payload.org_id,
            "session_id": uuid.UUID(payload.session_id),
            "session_key": payload.session_key,
            "agent_id": payload.agent_id,
            "input_text": payload.input.text,
            "task_id": payload.task_id or None,
            "created_at": stamp,
        }
        lifecycle = list(relayed) + run_events({**info, "status": RunStatus.QUEUED}, source=self.gateway_id)
        if claim_for is not None:
            lifecycle += run_events(
                {
                    **info,
                    "status": RunStatus.RUNNING,
                    "attempt": 1,
                    "first_claimed_at": stamp,
                    "started_at": stamp,
                },
                source=self.gateway_id,
            )
        sources = ["sessions"] * len(relayed) + [""] * (len(lifecycle) - len(relayed))
        extra = [_idempotency_lock(payload)] if if_idle else []
        row = await conn.fetchrow(
            _INSERT_IF_IDLE_SQL if if_idle else _INSERT_SQL,
            run_id,
            payload.org_id,
            uuid.UUID(payload.session_id),
            payload.session_key,
            payload.agent_id,
            payload.SerializeToString(),
            payload.input.text,
            json.dumps(dict(payload.metadata)),
            payload.idempotency_key or None,
            fingerprint,
            strategy,
            self.max_attempts,
            encode_batch([queued]),
            uuid.UUID(payload.task_id) if payload.task_id else None,
            claim_for,
            self.gateway_id,
            self.lease_s,
            *OUTBOX.emit_args(lifecycle, sources),
            *extra,
        )
        return row if if_idle else db.returned(row)  # an INSERT ... RETURNING

    @staticmethod
    def _check_fingerprint(existing: asyncpg.Record, fingerprint: bytes) -> None:
        if existing["request_hash"] is not None and bytes(existing["request_hash"]) != fingerprint:
            raise InvalidArgument(
                f"idempotency_key was already used for run {existing['id']} with a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                field="idempotency_key",
                metadata={"run_id": str(existing["id"])},
            )

    async def _collect_into(
        self, conn: db.Connection, follow_up: asyncpg.Record, payload: common_pb2.RunPayload
    ) -> asyncpg.Record | None:
        """Merge ``payload``'s text into the queued ``follow_up``; None when it
        is no longer queued (a claim does not take the session's lock, so a
        dispatcher may have started it since it was read)."""
        merged = common_pb2.RunPayload.FromString(follow_up["payload"])
        # The follow-up's own text moves into the collected messages; the
        # newest message becomes the run's text.
        if merged.input.text:
            merged.input.messages.append(
                common_pb2.Message(role=common_pb2.ROLE_USER, content=merged.input.text)
            )
        merged.input.messages.extend(payload.input.messages)
        merged.input.text = payload.input.text
        texts = [m.content for m in merged.input.messages if m.role == common_pb2.ROLE_USER] + [
            merged.input.text
        ]
        return await conn.fetchrow(
            f"""
            UPDATE gateway.runs SET payload = $2, input_text = $3 WHERE id = $1 AND status = 'queued'
            RETURNING {_RUN_COLUMNS}
            """,
            follow_up["id"],
            merged.SerializeToString(),
            "\n\n".join(texts),
        )

    async def _interrupt(self, conn: db.Connection, run_ids: Sequence[uuid.UUID]) -> None:
        cancelled = encode_batch(
            [event_bytes(cancelled=common_pb2.RunCancelled(reason="interrupted by a newer message"))]
        )
        dropped = await conn.fetch(  # for their lifecycle events (run.failed, status CANCELLED)
            f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = ANY($1::uuid[]) "
            "AND status IN ('queued', 'requires_action') FOR UPDATE",
            list(run_ids),
        )
        await emit_run_events(
            conn, [{**dict(r), "status": RunStatus.CANCELLED} for r in dropped], source=self.gateway_id
        )
        if dropped:
            metrics.RUNS_TOTAL.labels(RunStatus.CANCELLED).inc(len(dropped))
        await conn.execute(
            f"""
            WITH q AS (
                UPDATE gateway.runs SET status = 'cancelled', ended_at = now(), last_seq = last_seq + 1,
                    cancel_reason = 'INTERRUPTED', action_expires_at = NULL
                WHERE id = ANY($1::uuid[]) AND status IN ('queued', 'requires_action')
                RETURNING id, last_seq
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
                SELECT id, last_seq, last_seq, $2 FROM q
            ), r AS (
                UPDATE gateway.runs SET cancel_requested = true, cancel_reason = 'INTERRUPTED'
                WHERE id = ANY($1::uuid[]) AND status = 'running'
                RETURNING id, epoch, gateway_id
            )
            SELECT pg_notify('{EVENTS_CHANNEL}', q.id::text || ':' || q.last_seq) FROM q
            UNION ALL
            SELECT pg_notify('{CANCEL_CHANNEL}',
                             r.id::text || ':' || r.epoch || ':' || coalesce(r.gateway_id, ''))
            FROM r
            """,
            list(run_ids),
            cancelled,
        )

    # ------------------------------------------------------------ claims and leases

    async def claim(self, worker_ids: Sequence[str]) -> list[Claim]:
        """Claim up to one queued run per entry of ``worker_ids`` (a worker
        appears once per free slot), oldest first, in one statement; the
        i-th run goes to ``worker_ids[i]``.

        A run is runnable when its session has no running run and no older
        queued run (so two claimed runs never share a session).
        """
        if not worker_ids:
            return []
        for _ in range(5):
            try:
                rows = await fetch_with_events(  # + run.started, same transaction
                    self.pool,
                    f"""
                    WITH picked AS (
                        SELECT q.id, row_number() OVER (ORDER BY q.queue_pos) AS n FROM (
                            SELECT q.id, q.queue_pos FROM gateway.runs q
                            WHERE q.status = 'queued'
                              AND NOT EXISTS (SELECT 1 FROM gateway.runs a
                                              WHERE a.session_id = q.session_id
                                                AND a.status IN ('running', 'requires_action'))
                              AND NOT EXISTS (SELECT 1 FROM gateway.runs b
                                              WHERE b.session_id = q.session_id AND b.status = 'queued'
                                                AND b.queue_pos < q.queue_pos)
                            ORDER BY q.queue_pos
                            LIMIT cardinality($1::text[])
                            FOR UPDATE SKIP LOCKED
                        ) q
                    ), slots AS (
                        SELECT w.worker_id, w.n FROM unnest($1::text[]) WITH ORDINALITY AS w(worker_id, n)
                    )
                    UPDATE gateway.runs r
                    SET status = 'running', epoch = r.epoch + 1, attempt = r.attempt + 1,
                        worker_id = slots.worker_id, gateway_id = $2, worker_seq = 0,
                        lease_expires_at = now() + make_interval(secs => $3),
                        started_at = now(), first_claimed_at = coalesce(r.first_claimed_at, now())
                    FROM picked JOIN slots USING (n)
                    WHERE r.id = picked.id
                    RETURNING {", ".join(f"r.{c}" for c in _INFO_COLUMNS)}, r.payload, r.epoch, r.last_seq,
                              r.worker_id, r.status, r.continuation
                    """,
                    list(worker_ids),
                    self.gateway_id,
                    self.lease_s,
                    source=self.gateway_id,
                )
            except asyncpg.UniqueViolationError:
                continue  # another gateway started a run of one of those sessions first
            return [Claim.from_row(row) for row in rows]
        return []

    async def renew(self, worker_id: str, leases: Sequence[tuple[uuid.UUID, int]]) -> set[uuid.UUID]:
        """Renew leases held by ``worker_id``; returns the run ids still held."""
        if not leases:
            return set()
        rows = await self.pool.fetch(
            """
            UPDATE gateway.runs r SET lease_expires_at = now() + make_interval(secs => $4), gateway_id = $5
            FROM unnest($2::uuid[], $3::bigint[]) AS l(id, epoch)
            WHERE r.id = l.id AND r.epoch = l.epoch AND r.status = 'running' AND r.worker_id = $1
            RETURNING r.id
            """,
            worker_id,
            [run_id for run_id, _ in leases],
            [epoch for _, epoch in leases],
            self.lease_s,
            self.gateway_id,
        )
        return {row["id"] for row in rows}

    async def reattach(self, worker_id: str, leases: Sequence[tuple[uuid.UUID, int]]) -> list[Claim]:
        """Accept runs a reconnecting worker still executes (same epochs).

        Returns the runs granted, with their persisted ``last_seq`` and (in
        ``row["worker_seq"]``) the worker's last persisted event counter.
        """
        if not leases:
            return []
        rows = await self.pool.fetch(
            f"""
            UPDATE gateway.runs r SET lease_expires_at = now() + make_interval(secs => $4), gateway_id = $5
            FROM unnest($2::uuid[], $3::bigint[]) AS l(id, epoch)
            WHERE r.id = l.id AND r.epoch = l.epoch AND r.status = 'running' AND r.worker_id = $1
            RETURNING {", ".join(f"r.{c}" for c in _INFO_COLUMNS)}, r.payload, r.epoch, r.last_seq,
                      r.worker_id, r.worker_seq
            """,
            worker_id,
            [run_id for run_id, _ in leases],
            [epoch for _, epoch in leases],
            self.lease_s,
            self.gateway_id,
        )
        claims = []
        for row in rows:
            claim = Claim.from_row(row)
            claim.row["worker_seq"] = row["worker_seq"]
            claims.append(claim)
        return claims

    async def requeue(
        self,
        leases: Sequence[tuple[uuid.UUID, int]] | None,
        *,
        count_attempt: bool = True,
        window: int = 0,
    ) -> list[asyncpg.Record]:
        """Hand running runs back to the queue.

        ``leases`` are ``(run_id, epoch)`` pairs to release now (a worker left
        or gave them back; the caller has persisted their events first); None
        means every run whose lease has lapsed. A run with a pending cancel
        ends ``cancelled``; a run that has now been lost ``max_attempts``
        times ends ``failed`` (ATTEMPTS_EXHAUSTED). With
        ``count_attempt=False`` (a graceful release) the loss is not counted.

        A lapsed run's gateway may be dead after delivering up to ``window``
        events from memory that it never stored: those seqs are filled with
        empty deltas (:data:`FILLER_EVENT`), so the next attempt's events get
        seqs no client has seen, and a client resuming inside the gap reads
        the fillers, then the new attempt (``started`` with a higher
        ``attempt`` tells it to drop the partial answer).

        Returns the rows changed (``id``, ``status``, ``session_id``, ...).
        """
        exhausted = common_pb2.RunError(
            code="UNAVAILABLE",
            reason="ATTEMPTS_EXHAUSTED",
            message="the run's worker was lost on every attempt (gateway.max_attempts)",
            retryable=True,
        )
        failed = encode_batch([event_bytes(failed=common_pb2.RunFailed(error=exhausted))])
        failed_error = exhausted.SerializeToString()
        cancelled = encode_batch([event_bytes(cancelled=common_pb2.RunCancelled(reason="cancelled"))])
        ids = [run_id for run_id, _ in leases] if leases is not None else None
        epochs = [epoch for _, epoch in leases] if leases is not None else None
        fill = window if leases is None else 0
        fillers = encode_batch([FILLER_EVENT] * fill)
        rows = await fetch_with_events(  # + run.failed for runs that end here, same transaction
            self.pool,
            f"""
            WITH target AS (
                SELECT r.id FROM gateway.runs r
                WHERE r.status = 'running'
                  AND CASE WHEN $1::uuid[] IS NULL THEN r.lease_expires_at < now()
                           ELSE (r.id, r.epoch) IN (SELECT * FROM unnest($1::uuid[], $2::bigint[])) END
                FOR UPDATE SKIP LOCKED
            ), decided AS (
                SELECT r.id,
                       CASE WHEN r.cancel_requested THEN 'cancelled'
                            WHEN $3 AND r.lost_count + 1 >= r.max_attempts THEN 'failed'
                            ELSE 'queued' END AS next_status
                FROM gateway.runs r JOIN target USING (id)
            ), upd AS (
                UPDATE gateway.runs r SET
                    status = d.next_status,
                    lost_count = r.lost_count + CASE WHEN $3 THEN 1 ELSE 0 END,
                    worker_id = NULL, gateway_id = NULL, lease_expires_at = NULL,
                    ended_at = CASE WHEN d.next_status <> 'queued' THEN now() END,
                    error = CASE WHEN d.next_status = 'failed' THEN $6::bytea END,
                    last_seq = r.last_seq + $7 + CASE WHEN d.next_status <> 'queued' THEN 1 ELSE 0 END
                FROM decided d WHERE r.id = d.id
                RETURNING r.id, r.status, r.session_id, r.org_id, r.last_seq, r.created_at, r.started_at,
                          r.session_key, r.agent_id, r.attempt, r.error, r.ended_at, r.task_id,
                          r.first_claimed_at,
                          $7 + CASE WHEN d.next_status <> 'queued' THEN 1 ELSE 0 END AS added
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
                SELECT id, last_seq - added + 1, last_seq,
                       $8::bytea || CASE WHEN status = 'failed' THEN $4::bytea
                                         WHEN status = 'cancelled' THEN $5::bytea ELSE ''::bytea END
                FROM upd WHERE added > 0
            )
            SELECT upd.*,
                   CASE WHEN added > 0
                        THEN pg_notify('{EVENTS_CHANNEL}', id::text || ':' || last_seq) END AS n1,
                   pg_notify('{QUEUE_CHANNEL}', '') AS n2
            FROM upd
            """,
            ids,
            epochs,
            count_attempt,
            failed,
            cancelled,
            failed_error,
            fill,
            fillers,
            source=self.gateway_id,
            statuses=(RunStatus.FAILED, RunStatus.CANCELLED),
        )
        for row in rows:
            if row["status"] != RunStatus.QUEUED:
                metrics.RUNS_TOTAL.labels(row["status"]).inc()
        return list(rows)

    async def write_events(self, chunks: Sequence[EventChunk]) -> dict[uuid.UUID, bool]:
        """Store event chunks of running runs, one statement for all.

        A chunk is written only if its run is still running at the chunk's
        epoch and ``first_seq`` follows the stored ``last_seq``. Returns, per
        run, True when its chunk is stored (now, or by an earlier attempt of
        the same write whose answer was lost), False when the run is no
        longer this epoch's (the events are not to be written).
        """
        arrays = (
            [c.run_id for c in chunks],
            [c.epoch for c in chunks],
            [c.first_seq for c in chunks],
            [c.last_seq for c in chunks],
            [c.data for c in chunks],
            [c.worker_seq for c in chunks],
        )
        lifecycle = [(c.run_id, event) for c in chunks for event in c.lifecycle]
        if lifecycle:  # tool events among them: their lifecycle events go into the same statement
            rows = await self.pool.fetch(
                _WRITE_EVENTS_WITH_LIFECYCLE_SQL,
                *arrays,
                *OUTBOX.emit_args([event for _, event in lifecycle]),
                [run_id for run_id, _ in lifecycle],
            )
        else:
            rows = await self.pool.fetch(_WRITE_EVENTS_SQL, *arrays)
        return {row["run_id"]: bool(row["written"] or row["already"]) for row in rows}

    # ------------------------------------------------------------ endings

    async def lock(self, conn: db.Connection, run_id: uuid.UUID) -> asyncpg.Record | None:
        """Lock the run's row for the rest of the transaction."""
        return await conn.fetchrow(
            "SELECT id, org_id, session_id, agent_id, epoch, status, cancel_requested, cancel_reason, "
            "started_at, created_at FROM gateway.runs WHERE id = $1 FOR UPDATE",
            run_id,
        )

    async def finish(
        self,
        conn: db.Executor,
        run_id: uuid.UUID,
        *,
        status: RunStatus,
        event: bytes,
        model: str = "",
        usage: common_pb2.Usage | None = None,
        error: common_pb2.RunError | None = None,
        epoch: int | None = None,
        info: Mapping[str, Any] | None = None,
        pending: Sequence[bytes] = (),
        expected_last_seq: int | None = None,
        relayed: Sequence[common_pb2.LifecycleEvent] = (),
        transcript_turn: int | None = None,
    ) -> int:
        """End a run (still queued, running or waiting for client tool
        results, at ``epoch`` if given) with
        its terminal ``event``, in one statement; returns the event's seq, or
        0 when the run had already ended or moved on (nothing is written).

        ``pending`` are the run's events not stored yet (serialized, in seq
        order after ``expected_last_seq``, which must then be the stored
        ``last_seq``); they are stored with the terminal event as one chunk.
        ``info`` (the run's lifecycle fields, see :class:`Claim`) lets the
        lifecycle events (tool.called / tool.completed of ``pending``'s tool
        events, then run.completed and message.sent, or run.failed) go into
        the same statement; without it they are written after it (and
        ``pending`` must hold no tool events),
        so pass a connection in a transaction. ``relayed`` are sessions
        events to record before them (a commit's session.updated);
        ``transcript_turn`` the turn the run's commit produced in its session.
        """
        added = len(pending) + 1
        lifecycle: list[common_pb2.LifecycleEvent] = []
        if info is not None:
            ended = {
                **info,
                "status": status,
                "model": model or None,
                "error": error.SerializeToString() if error is not None else None,
                "ended_at": dt.datetime.now(dt.UTC),
            }
            tools = tool_lifecycle(
                info, pending, source=self.gateway_id
            )  # tool.called/completed of `pending`
            lifecycle = list(relayed) + tools + run_events(ended, source=self.gateway_id, run_event=event)
        sources = (
            ["sessions"] * len(relayed) + [""] * (len(lifecycle) - len(relayed)) if info is not None else []
        )
        seq = await conn.fetchval(
            f"""
            WITH upd AS (
                UPDATE gateway.runs SET status = $2, ended_at = now(), last_seq = last_seq + $8,
                    model = coalesce(nullif($4, ''), model),
                    input_tokens = $5, output_tokens = $6, error = $7,
                    worker_id = NULL, lease_expires_at = NULL, action_expires_at = NULL,
                    transcript_turn = ${11 + OUTBOX.arg_count}
                WHERE id = $1 AND status IN ('queued', 'running', 'requires_action')
                  AND ($9::bigint IS NULL OR epoch = $9) AND ($10::bigint IS NULL OR last_seq = $10)
                RETURNING id, last_seq, session_id, task_id
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
                SELECT id, last_seq - $8 + 1, last_seq, $3 FROM upd
            ), ob AS ({OUTBOX.insert_sql(11, when="EXISTS (SELECT 1 FROM upd)")})
            SELECT last_seq FROM upd, LATERAL (
                SELECT pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last_seq),
                       -- The session's next run can start now, or a background task's run
                       -- ended: wake the dispatchers and task managers (only then).
                       CASE WHEN upd.task_id IS NOT NULL
                                 OR EXISTS (SELECT 1 FROM gateway.runs q
                                            WHERE q.session_id = upd.session_id AND q.status = 'queued')
                            THEN pg_notify('{QUEUE_CHANNEL}', '') END
            ) n
            """,
            run_id,
            status,
            encode_batch([*pending, event]),
            model,
            usage.input_tokens if usage else 0,
            usage.output_tokens if usage else 0,
            error.SerializeToString() if error is not None else None,
            added,
            epoch,
            expected_last_seq,
            *OUTBOX.emit_args(lifecycle, sources),
            transcript_turn,
        )
        if (
            seq and info is None
        ):  # lifecycle events (run.completed + message.sent, or run.failed), same transaction
            row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = $1", run_id)
            await emit_run_events(conn, [row], source=self.gateway_id, run_event=event)
        return int(seq or 0)

    async def cancel(self, org_id: str, run_id: uuid.UUID, reason: str) -> asyncpg.Record:
        """Cancel a run: a queued run, or one waiting for client tool results,
        ends at once; a running one is asked to stop.

        Raises:
            NotFound: no such run in this org.
        """
        cancelled = event_bytes(cancelled=common_pb2.RunCancelled(reason=reason or "cancelled by the client"))
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT id, status, epoch, gateway_id FROM gateway.runs "
                "WHERE id = $1 AND org_id = $2 FOR UPDATE",
                run_id,
                org_id,
            )
            if row is None:
                raise NotFound(f"run {run_id} not found", reason="RUN_NOT_FOUND", field="run_id")
            if row["status"] in (RunStatus.QUEUED, RunStatus.REQUIRES_ACTION):  # no worker holds it
                if await self.finish(conn, run_id, status=RunStatus.CANCELLED, event=cancelled):
                    metrics.RUNS_TOTAL.labels(RunStatus.CANCELLED).inc()
            elif row["status"] == RunStatus.RUNNING:
                await conn.execute(
                    "UPDATE gateway.runs SET cancel_requested = true, cancel_reason = $2 WHERE id = $1",
                    run_id,
                    reason or "CANCELLED",
                )
                await conn.execute(
                    "SELECT pg_notify($1, $2)",
                    CANCEL_CHANNEL,
                    f"{run_id}:{row['epoch']}:{row['gateway_id'] or ''}",
                )
            row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = $1", run_id)
            return db.returned(row)  # locked above

    # ------------------------------------------------------------ client-side tools (issue 13)

    async def pause(
        self,
        conn: db.Executor,
        run_id: uuid.UUID,
        *,
        epoch: int,
        event: bytes,
        continuation: bytes,
        expires_at: dt.datetime,
        info: Mapping[str, Any] | None = None,
        pending: Sequence[bytes] = (),
        expected_last_seq: int | None = None,
    ) -> int:
        """Park a running run (at ``epoch``) in ``requires_action``, in one
        statement: its unstored events (``pending``, as in :meth:`finish`)
        and its ``requires_action`` ``event`` as one chunk, the
        ``continuation`` (RunContinuation bytes) and its expiry, the worker
        released, and the tool lifecycle events of ``pending``. Returns the
        event's seq, or 0 when the run is no longer running at ``epoch``
        (nothing is written)."""
        added = len(pending) + 1
        lifecycle = tool_lifecycle(info, pending, source=self.gateway_id)
        seq = await conn.fetchval(
            f"""
            WITH upd AS (
                UPDATE gateway.runs SET status = 'requires_action', last_seq = last_seq + $3,
                    continuation = $4,
                    action_expires_at = $5, worker_id = NULL, gateway_id = NULL, lease_expires_at = NULL
                WHERE id = $1 AND status = 'running' AND epoch = $6
                  AND ($7::bigint IS NULL OR last_seq = $7)
                RETURNING id, last_seq
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
                SELECT id, last_seq - $3 + 1, last_seq, $2 FROM upd
            ), ob AS ({OUTBOX.insert_sql(8, when="EXISTS (SELECT 1 FROM upd)")})
            SELECT last_seq FROM upd, LATERAL (
                SELECT pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last_seq)
            ) n
            """,
            run_id,
            encode_batch([*pending, event]),
            added,
            continuation,
            expires_at,
            epoch,
            expected_last_seq,
            *OUTBOX.emit_args(lifecycle),
        )
        return int(seq or 0)

    async def waiting(self, run_id: uuid.UUID) -> asyncpg.Record | None:
        """``(continuation, action_expires_at)`` of a run waiting for client
        tool results; None when the run is not waiting."""
        return await self.pool.fetchrow(
            "SELECT continuation, action_expires_at FROM gateway.runs "
            "WHERE id = $1 AND status = 'requires_action'",
            run_id,
        )

    async def lock_waiting(self, conn: db.Connection, org_id: str, run_id: uuid.UUID) -> asyncpg.Record:
        """Lock a run of ``org_id`` for recording tool results (the rest of
        the transaction); its row has the lifecycle fields, ``status``,
        ``continuation`` and ``action_expires_at``.

        Raises:
            NotFound: no such run in this org (another org's run looks the same).
        """
        row = await conn.fetchrow(
            f"SELECT {_RUN_COLUMNS}, continuation, action_expires_at FROM gateway.runs "
            "WHERE id = $1 AND org_id = $2 FOR UPDATE",
            run_id,
            org_id,
        )
        if row is None:
            raise NotFound(f"run {run_id} not found", reason="RUN_NOT_FOUND", field="run_id")
        return row

    async def record_tool_results(
        self,
        conn: db.Connection,
        run_id: uuid.UUID,
        *,
        events: Sequence[bytes],
        continuation: bytes,
        resume: bool,
        info: db.Row,
    ) -> int:
        """Record client tool results of a waiting run (locked by
        :meth:`lock_waiting`), in one statement: their ``tool_result``
        ``events`` (one chunk) with their ``tool.completed`` lifecycle
        events, the updated ``continuation``, and with ``resume`` the run
        back to ``queued`` (it keeps its place: its session's next runs wait
        behind it). Returns the run's ``last_seq`` after it (0 when the run
        no longer waits)."""
        lifecycle = tool_lifecycle(info, events, source=self.gateway_id)
        added = len(events)
        seq = await conn.fetchval(
            f"""
            WITH upd AS (
                UPDATE gateway.runs SET continuation = $2, last_seq = last_seq + $3,
                    status = CASE WHEN $4 THEN 'queued' ELSE status END,
                    action_expires_at = CASE WHEN $4 THEN NULL ELSE action_expires_at END
                WHERE id = $1 AND status = 'requires_action'
                RETURNING id, last_seq
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, last_seq, data)
                SELECT id, last_seq - $3 + 1, last_seq, $5 FROM upd WHERE $3 > 0
            ), ob AS ({OUTBOX.insert_sql(6, when="EXISTS (SELECT 1 FROM upd)")})
            SELECT last_seq FROM upd, LATERAL (
                SELECT CASE WHEN $3 > 0
                            THEN pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last_seq) END,
                       CASE WHEN $4 THEN pg_notify('{QUEUE_CHANNEL}', '') END
            ) n
            """,
            run_id,
            continuation,
            added,
            resume,
            encode_batch(events),
            *OUTBOX.emit_args(lifecycle),
        )
        return int(seq or 0)

    async def lock_expired_waits(self, conn: db.Connection, limit: int = 100) -> list[asyncpg.Record]:
        """Lock waiting runs whose tool results are overdue (oldest first,
        skipping runs another transaction holds); rows have ``id``,
        ``continuation`` and ``action_expires_at``."""
        return list(
            await conn.fetch(
                """
            SELECT id, continuation, action_expires_at FROM gateway.runs
            WHERE status = 'requires_action' AND action_expires_at < now()
            ORDER BY action_expires_at LIMIT $1
            FOR UPDATE SKIP LOCKED
            """,
                limit,
            )
        )

    # ------------------------------------------------------------ reads

    async def get(self, org_id: str, run_id: uuid.UUID) -> asyncpg.Record:
        """The run, scoped by org.

        Raises:
            NotFound: no such run in this org (another org's id looks the same).
        """
        row = await self.pool.fetchrow(
            f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = $1 AND org_id = $2", run_id, org_id
        )
        if row is None:
            raise NotFound(f"run {run_id} not found", reason="RUN_NOT_FOUND", field="run_id")
        return row

    async def list_for_session(
        self, org_id: str, session_id: uuid.UUID, size: int, token: str
    ) -> tuple[list[common_pb2.Run], str]:
        """One page of a session's runs, oldest first."""
        limit = page_size(size)
        after = decode_time_cursor("runs", token)
        rows = await self.pool.fetch(
            f"""
            SELECT {_RUN_COLUMNS} FROM gateway.runs
            WHERE org_id = $1 AND session_id = $2
              AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4))
            ORDER BY created_at, id LIMIT $5
            """,
            org_id,
            session_id,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
        page, next_token = time_cursor_page("runs", rows, limit)
        return [run_proto(r) for r in page], next_token

    async def events_after(
        self, run_id: uuid.UUID, session_id: str, after_seq: int, limit: int = 64
    ) -> tuple[list[common_pb2.RunEvent], bool]:
        """Stored events of a run with ``seq > after_seq``, in order, from at
        most ``limit`` chunks; the flag says whether more chunks may follow."""
        rows = await self.pool.fetch(
            "SELECT seq, last_seq, data FROM gateway.run_events WHERE run_id = $1 AND last_seq > $2 "
            "ORDER BY seq LIMIT $3",
            run_id,
            after_seq,
            limit,
        )
        events: list[common_pb2.RunEvent] = []
        for row in rows:
            events += [
                e
                for e in decode_batch(run_id, session_id, row["seq"], bytes(row["data"]))
                if e.seq > after_seq
            ]
        return events, len(rows) == limit

    async def status(self, run_id: uuid.UUID) -> str | None:
        status: str | None = await self.pool.fetchval("SELECT status FROM gateway.runs WHERE id = $1", run_id)
        return status

    async def queue_depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM gateway.runs WHERE status = 'queued'"))

    # ------------------------------------------------------------ background tasks (runyard.gateway.tasks)
    # Every query the tasks code makes on gateway.runs and its events goes
    # through these, so the runs table has one owner. ``conn`` is the caller's
    # connection when the read belongs to its transaction (None: the pool).

    async def active_runs_of_tasks(
        self, conn: db.Connection, task_ids: Sequence[uuid.UUID]
    ) -> list[asyncpg.Record]:
        """``(id, org_id)`` of the queued or running runs of tasks ``task_ids``."""
        return list(
            await conn.fetch(
                "SELECT id, org_id FROM gateway.runs "
                "WHERE task_id = ANY($1::uuid[]) AND status IN ('queued', 'running', 'requires_action')",
                list(task_ids),
            )
        )

    async def active_task_runs(self) -> list[asyncpg.Record]:
        """``(id, org_id, task_id)`` of every queued or running run of a task
        that was not asked to cancel yet."""
        return list(
            await self.pool.fetch(
                "SELECT id, org_id, task_id FROM gateway.runs "
                "WHERE task_id IS NOT NULL AND status IN ('queued', 'running', 'requires_action') "
                "AND NOT cancel_requested"
            )
        )

    async def ended_statuses(
        self, run_ids: Sequence[uuid.UUID], conn: db.Connection | None = None
    ) -> dict[uuid.UUID, str]:
        """Run id -> status, for those of ``run_ids`` that ended (completed, failed, cancelled)."""
        if not run_ids:
            return {}
        rows = await (conn or self.pool).fetch(
            "SELECT id, status FROM gateway.runs "
            "WHERE id = ANY($1::uuid[]) AND status IN ('completed', 'failed', 'cancelled')",
            list(run_ids),
        )
        return {row["id"]: row["status"] for row in rows}

    async def outcome(self, conn: db.Connection, run_id: uuid.UUID) -> asyncpg.Record | None:
        """``(id, status, error, last_seq, cancel_reason)`` of a run, if it exists."""
        return await conn.fetchrow(
            "SELECT id, status, error, last_seq, cancel_reason FROM gateway.runs WHERE id = $1", run_id
        )

    async def first_events(
        self, conn: db.Connection, run_id: uuid.UUID, limit: int
    ) -> list[common_pb2.RunEvent]:
        """The run's first ``limit`` stored events (whole chunks read, then cut)."""
        rows = await conn.fetch(
            "SELECT seq, data FROM gateway.run_events WHERE run_id = $1 AND seq <= $2 ORDER BY seq",
            run_id,
            limit,
        )
        events = [e for r in rows for e in decode_batch(run_id, "", r["seq"], bytes(r["data"]))]
        return events[:limit]

    async def last_event(self, conn: db.Connection, run_id: uuid.UUID, last_seq: int) -> common_pb2.RunEvent:
        """The last event of the stored chunk holding ``last_seq`` (an ended
        run's terminal event); an empty event when there is none."""
        chunk = await conn.fetchrow(
            "SELECT seq, data FROM gateway.run_events WHERE run_id = $1 AND seq <= $2 AND last_seq >= $2",
            run_id,
            last_seq,
        )
        stored = decode_batch(run_id, "", chunk["seq"], bytes(chunk["data"])) if chunk is not None else []
        return stored[-1] if stored else common_pb2.RunEvent()

    async def store_payload(self, conn: db.Connection, run_id: uuid.UUID, epoch: int, payload: bytes) -> bool:
        """Replace the payload of a run still running at ``epoch``; whether it was."""
        updated = await conn.fetchval(
            "UPDATE gateway.runs SET payload = $2 "
            "WHERE id = $1 AND epoch = $3 AND status = 'running' RETURNING id",
            run_id,
            payload,
            epoch,
        )
        return updated is not None

    async def session_busy(self, session_id: uuid.UUID, conn: db.Connection | None = None) -> bool:
        """Whether the session has a queued or running run."""
        return bool(
            await (conn or self.pool).fetchval(
                "SELECT EXISTS (SELECT 1 FROM gateway.runs "
                "WHERE session_id = $1 AND status IN ('queued', 'running', 'requires_action'))",
                session_id,
            )
        )

    async def last_payload(self, conn: db.Connection, session_id: uuid.UUID) -> common_pb2.RunPayload | None:
        """The payload of the session's newest run, if it has one."""
        row = await conn.fetchrow(
            "SELECT payload FROM gateway.runs WHERE session_id = $1 ORDER BY created_at DESC LIMIT 1",
            session_id,
        )
        return common_pb2.RunPayload.FromString(bytes(row["payload"])) if row is not None else None

    async def token_run(self, org_id: str, run_id: uuid.UUID) -> asyncpg.Record | None:
        """``(status, epoch, session_key)`` of a run, scoped by org (what a
        run token is checked against)."""
        return await self.pool.fetchrow(
            "SELECT status, epoch, session_key FROM gateway.runs WHERE id = $1 AND org_id = $2",
            run_id,
            org_id,
        )
