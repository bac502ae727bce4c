"""The runs queue in PostgreSQL (schema ``gateway``).

* Insert with an idempotency key: a repeat returns the existing run.
* At most one running run per session (partial unique index); queued runs of
  a session run in arrival order.
* Claims use ``FOR UPDATE SKIP LOCKED``, bump the run's ``epoch`` and set a
  lease that worker heartbeats renew; a lapsed lease re-queues the run
  (attempts are counted and capped, then the run fails).
* Every status change that ends a run writes its terminal event in the same
  statement, so a run never ends without its event.
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from runyard._proto.v1 import common_pb2
from runyard.common import metrics
from runyard.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from runyard.common.pagination import decode_time_cursor, page_size, time_cursor_page
from runyard.common.protoutil import now, timestamp
from runyard.gateway.watch import emit_run_events, fetch_with_events, fetchrow_with_events

__all__ = [
    "CANCEL_CHANNEL",
    "EVENTS_CHANNEL",
    "QUEUE_CHANNEL",
    "Claim",
    "RunStore",
    "TERMINAL",
    "event_bytes",
    "request_hash",
]

QUEUE_CHANNEL = "runyard_runs"
EVENTS_CHANNEL = "runyard_run_events"
CANCEL_CHANNEL = "runyard_run_cancel"

TERMINAL = frozenset({"completed", "failed", "cancelled"})
_STATUS = {
    "queued": common_pb2.RUN_STATUS_QUEUED,
    "running": common_pb2.RUN_STATUS_RUNNING,
    "completed": common_pb2.RUN_STATUS_COMPLETED,
    "failed": common_pb2.RUN_STATUS_FAILED,
    "cancelled": common_pb2.RUN_STATUS_CANCELLED,
}
_STRATEGY_NAMES = {
    value: name.removeprefix("MULTITASK_STRATEGY_") for name, value in common_pb2.MultitaskStrategy.items()
}
_STRATEGY_VALUES = {name: value for value, name in _STRATEGY_NAMES.items()}

_RUN_COLUMNS = (
    "id, org_id, session_id, session_key, agent_id, status, input_text, metadata, idempotency_key, "
    "multitask_strategy, attempt, epoch, worker_id, gateway_id, cancel_requested, last_seq, model, "
    "input_tokens, output_tokens, error, task_id, created_at, started_at, ended_at, first_claimed_at"
)


def event_bytes(**event: Any) -> bytes:
    """Serialized ``RunEvent`` with one oneof member set and the current time."""
    message = common_pb2.RunEvent(time=now(), **event)
    return message.SerializeToString()


def request_hash(request: Any) -> bytes:
    """Fingerprint of a SendMessage request (idempotent repeats must match it)."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).digest()


@dataclass(frozen=True, slots=True)
class Claim:
    """A run claimed for a worker."""

    run_id: uuid.UUID
    org_id: str
    session_id: uuid.UUID
    agent_id: str
    payload: bytes
    epoch: int
    attempt: int
    created_at: dt.datetime
    first_claim: bool


def run_proto(row: asyncpg.Record) -> common_pb2.Run:
    """A ``Run`` message from a ``gateway.runs`` row."""
    run = common_pb2.Run(
        id=str(row["id"]),
        session_id=str(row["session_id"]),
        session_key=row["session_key"],
        agent_id=row["agent_id"],
        status=_STATUS[row["status"]],
        create_time=timestamp(row["created_at"]),
        attempt=row["attempt"],
        idempotency_key=row["idempotency_key"] or "",
        model=row["model"] or "",
        usage=common_pb2.Usage(input_tokens=row["input_tokens"], output_tokens=row["output_tokens"]),
        last_seq=row["last_seq"],
        input_text=row["input_text"],
        metadata=json.loads(row["metadata"]) if isinstance(row["metadata"], str) else dict(row["metadata"] or {}),
        multitask_strategy=_STRATEGY_VALUES.get(row["multitask_strategy"], 0),
        task_id=str(row["task_id"] or ""),
    )
    if row["started_at"] is not None:
        run.start_time.CopyFrom(timestamp(row["started_at"]))
    if row["ended_at"] is not None:
        run.end_time.CopyFrom(timestamp(row["ended_at"]))
    if row["error"] is not None:
        run.error.ParseFromString(row["error"])
    return run


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
            f"SELECT {_RUN_COLUMNS}, request_hash FROM gateway.runs WHERE org_id = $1 AND idempotency_key = $2",
            org_id,
            key,
        )

    async def insert(
        self,
        payload: common_pb2.RunPayload,
        *,
        fingerprint: bytes,
        strategy: str,
        conn: asyncpg.Connection | None = None,
    ) -> tuple[asyncpg.Record, bool]:
        """Queue a run (its ``queued`` event is seq 1).

        With ``conn`` (a connection inside a transaction) the run is queued in
        that transaction (a savepoint), so it commits or rolls back with the
        caller's other changes (background tasks start their runs this way).

        ``strategy`` applies when the session already has an active run:
        ENQUEUE queues behind it; REJECT refuses; INTERRUPT asks the active
        runs to cancel and queues behind them; COLLECT merges the text into a
        queued COLLECT follow-up run when one exists.

        Returns:
            ``(run row, created)``; ``created`` is False when an idempotent
            repeat or a COLLECT merge returned an existing run.

        Raises:
            FailedPrecondition: REJECT while a run is active (reason
                SESSION_BUSY, metadata ``active_run_id``).
            ResourceExhausted: too many active runs on the session.
            InvalidArgument: idempotency key reused with a different request.
        """
        run_id = uuid.UUID(payload.run_id)
        session_id = uuid.UUID(payload.session_id)
        key = payload.idempotency_key or None
        connection = contextlib.nullcontext(conn) if conn is not None else self.pool.acquire()
        async with connection as conn, conn.transaction():
            # Serialize inserts per idempotency key (a repeat may name another
            # session), then per session; always in this order, so two inserts
            # never wait on each other crosswise. Transaction-scoped locks are
            # safe with pooled connections.
            if key is not None:
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"runyard.idem:{payload.org_id}:{key}"
                )
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", str(session_id))
            if key is not None:
                existing = await conn.fetchrow(
                    f"SELECT {_RUN_COLUMNS}, request_hash FROM gateway.runs WHERE org_id = $1 AND idempotency_key = $2",
                    payload.org_id,
                    key,
                )
                if existing is not None:
                    self._check_fingerprint(existing, fingerprint)
                    return existing, False
            active = await conn.fetch(
                """
                SELECT id, status, multitask_strategy, payload FROM gateway.runs
                WHERE session_id = $1 AND status IN ('queued', 'running') ORDER BY queue_pos
                """,
                session_id,
            )
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
                        (r for r in active if r["status"] == "queued" and r["multitask_strategy"] == "COLLECT"), None
                    )
                    if follow_up is not None:
                        merged = await self._collect_into(conn, follow_up, payload)
                        await emit_run_events(conn, [merged], source=self.gateway_id, only=["message.received"],
                                              message_length=len(payload.input.text))  # lifecycle event
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
            position = sum(1 for r in active if r["status"] in ("queued", "running") and strategy != "INTERRUPT")
            queued = event_bytes(queued=common_pb2.RunQueued(position=position))
            row = await conn.fetchrow(
                f"""
                WITH ins AS (
                    INSERT INTO gateway.runs (id, org_id, session_id, session_key, agent_id, status, payload,
                        input_text, metadata, idempotency_key, request_hash, multitask_strategy, max_attempts,
                        last_seq, task_id)
                    VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8::jsonb, $9, $10, $11, $12, 1, $14)
                    RETURNING {_RUN_COLUMNS}
                ), ev AS (
                    INSERT INTO gateway.run_events (run_id, seq, data) SELECT id, 1, $13 FROM ins
                )
                SELECT *, pg_notify('{QUEUE_CHANNEL}', '') FROM ins
                """,
                run_id,
                payload.org_id,
                session_id,
                payload.session_key,
                payload.agent_id,
                payload.SerializeToString(),
                payload.input.text,
                json.dumps(dict(payload.metadata)),
                key,
                fingerprint,
                strategy,
                self.max_attempts,
                queued,
                uuid.UUID(payload.task_id) if payload.task_id else None,
            )
            await emit_run_events(conn, [row], source=self.gateway_id)  # run.queued, message.received
            return row, True

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
        self, conn: asyncpg.Connection, follow_up: asyncpg.Record, payload: common_pb2.RunPayload
    ) -> asyncpg.Record:
        merged = common_pb2.RunPayload.FromString(follow_up["payload"])
        # The follow-up's own text moves into the collected messages; the
        # newest message becomes the run's text.
        if merged.input.text:
            merged.input.messages.append(common_pb2.Message(role=common_pb2.ROLE_USER, content=merged.input.text))
        merged.input.messages.extend(payload.input.messages)
        merged.input.text = payload.input.text
        texts = [m.content for m in merged.input.messages if m.role == common_pb2.ROLE_USER] + [merged.input.text]
        return await conn.fetchrow(
            f"""
            UPDATE gateway.runs SET payload = $2, input_text = $3 WHERE id = $1 AND status = 'queued'
            RETURNING {_RUN_COLUMNS}
            """,
            follow_up["id"],
            merged.SerializeToString(),
            "\n\n".join(texts),
        )

    async def _interrupt(self, conn: asyncpg.Connection, run_ids: Sequence[uuid.UUID]) -> None:
        cancelled = event_bytes(cancelled=common_pb2.RunCancelled(reason="interrupted by a newer message"))
        dropped = await conn.fetch(  # for their lifecycle events (run.failed, status CANCELLED)
            f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = ANY($1::uuid[]) AND status = 'queued' FOR UPDATE",
            list(run_ids),
        )
        await emit_run_events(conn, [{**dict(r), "status": "cancelled"} for r in dropped], source=self.gateway_id)
        if dropped:
            metrics.RUNS_TOTAL.labels("cancelled").inc(len(dropped))
        await conn.execute(
            f"""
            WITH q AS (
                UPDATE gateway.runs SET status = 'cancelled', ended_at = now(), last_seq = last_seq + 1,
                    cancel_reason = 'INTERRUPTED'
                WHERE id = ANY($1::uuid[]) AND status = 'queued'
                RETURNING id, last_seq
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, data) SELECT id, last_seq, $2 FROM q
            ), r AS (
                UPDATE gateway.runs SET cancel_requested = true, cancel_reason = 'INTERRUPTED'
                WHERE id = ANY($1::uuid[]) AND status = 'running'
                RETURNING id, epoch, gateway_id
            )
            SELECT pg_notify('{EVENTS_CHANNEL}', q.id::text || ':' || q.last_seq) FROM q
            UNION ALL
            SELECT pg_notify('{CANCEL_CHANNEL}', r.id::text || ':' || r.epoch || ':' || coalesce(r.gateway_id, ''))
            FROM r
            """,
            list(run_ids),
            cancelled,
        )

    # ------------------------------------------------------------ claims and leases

    async def claim(self, worker_id: str) -> Claim | None:
        """Claim the oldest runnable queued run for ``worker_id`` (None if none).

        A run is runnable when its session has no running run and no older
        queued run.
        """
        for _ in range(5):
            try:
                row = await fetchrow_with_events(  # + run.started, same transaction
                    self.pool,
                    """
                    UPDATE gateway.runs r
                    SET status = 'running', epoch = r.epoch + 1, attempt = r.attempt + 1,
                        worker_id = $1, gateway_id = $2, worker_seq = 0,
                        lease_expires_at = now() + make_interval(secs => $3),
                        started_at = now(), first_claimed_at = coalesce(r.first_claimed_at, now())
                    WHERE r.id = (
                        SELECT q.id FROM gateway.runs q
                        WHERE q.status = 'queued'
                          AND NOT EXISTS (SELECT 1 FROM gateway.runs a
                                          WHERE a.session_id = q.session_id AND a.status = 'running')
                          AND NOT EXISTS (SELECT 1 FROM gateway.runs b
                                          WHERE b.session_id = q.session_id AND b.status = 'queued'
                                            AND b.queue_pos < q.queue_pos)
                        ORDER BY q.queue_pos
                        LIMIT 1
                        FOR UPDATE SKIP LOCKED
                    )
                    RETURNING r.id, r.org_id, r.session_id, r.agent_id, r.payload, r.epoch, r.attempt,
                              r.created_at, r.first_claimed_at = r.started_at AS first_claim,
                              r.session_key, r.status, r.task_id, r.first_claimed_at
                    """,
                    worker_id,
                    self.gateway_id,
                    self.lease_s,
                    source=self.gateway_id,
                )
            except asyncpg.UniqueViolationError:
                continue  # another gateway started a run of that session first
            if row is None:
                return None
            return Claim(
                run_id=row["id"],
                org_id=row["org_id"],
                session_id=row["session_id"],
                agent_id=row["agent_id"],
                payload=bytes(row["payload"]),
                epoch=row["epoch"],
                attempt=row["attempt"],
                created_at=row["created_at"],
                first_claim=row["first_claim"],
            )
        return None

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

    async def reattach(
        self, worker_id: str, leases: Sequence[tuple[uuid.UUID, int]]
    ) -> dict[uuid.UUID, int]:
        """Accept runs a reconnecting worker still executes.

        Returns ``{run_id: last persisted worker_seq}`` for the runs granted.
        """
        if not leases:
            return {}
        rows = await self.pool.fetch(
            """
            UPDATE gateway.runs r SET lease_expires_at = now() + make_interval(secs => $4), gateway_id = $5
            FROM unnest($2::uuid[], $3::bigint[]) AS l(id, epoch)
            WHERE r.id = l.id AND r.epoch = l.epoch AND r.status = 'running' AND r.worker_id = $1
            RETURNING r.id, r.worker_seq
            """,
            worker_id,
            [run_id for run_id, _ in leases],
            [epoch for _, epoch in leases],
            self.lease_s,
            self.gateway_id,
        )
        return {row["id"]: row["worker_seq"] for row in rows}

    async def requeue(
        self,
        leases: Sequence[tuple[uuid.UUID, int]] | None,
        *,
        count_attempt: bool = True,
    ) -> list[asyncpg.Record]:
        """Hand running runs back to the queue.

        ``leases`` are ``(run_id, epoch)`` pairs to release now (a worker left
        or gave them back); None means every run whose lease has lapsed. A run
        with a pending cancel ends ``cancelled``; a run that has now been lost
        ``max_attempts`` times ends ``failed`` (ATTEMPTS_EXHAUSTED). With
        ``count_attempt=False`` (a graceful release) the loss is not counted.

        Returns the rows changed (``id``, ``status``, ``session_id``, ...).
        """
        exhausted = common_pb2.RunError(
            code="UNAVAILABLE",
            reason="ATTEMPTS_EXHAUSTED",
            message="the run's worker was lost on every attempt (gateway.max_attempts)",
            retryable=True,
        )
        failed = event_bytes(failed=common_pb2.RunFailed(error=exhausted))
        failed_error = exhausted.SerializeToString()
        cancelled = event_bytes(cancelled=common_pb2.RunCancelled(reason="cancelled"))
        ids = [run_id for run_id, _ in leases] if leases is not None else None
        epochs = [epoch for _, epoch in leases] if leases is not None else None
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
                    last_seq = r.last_seq + CASE WHEN d.next_status <> 'queued' THEN 1 ELSE 0 END
                FROM decided d WHERE r.id = d.id
                RETURNING r.id, r.status, r.session_id, r.org_id, r.last_seq, r.created_at, r.started_at,
                          r.session_key, r.agent_id, r.attempt, r.error, r.ended_at, r.task_id, r.first_claimed_at
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, data)
                SELECT id, last_seq, CASE WHEN status = 'failed' THEN $4::bytea ELSE $5::bytea END
                FROM upd WHERE status <> 'queued'
            )
            SELECT upd.*,
                   CASE WHEN status <> 'queued'
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
            source=self.gateway_id,
            statuses=("failed", "cancelled"),
        )
        for row in rows:
            if row["status"] != "queued":
                metrics.RUNS_TOTAL.labels(row["status"]).inc()
        return list(rows)

    # ------------------------------------------------------------ endings

    async def lock(self, conn: asyncpg.Connection, run_id: uuid.UUID) -> asyncpg.Record | None:
        """Lock the run's row for the rest of the transaction."""
        return await conn.fetchrow(
            "SELECT id, org_id, session_id, agent_id, epoch, status, cancel_requested, cancel_reason, "
            "started_at, created_at FROM gateway.runs WHERE id = $1 FOR UPDATE",
            run_id,
        )

    async def finish(
        self,
        conn: asyncpg.Connection,
        run_id: uuid.UUID,
        *,
        status: str,
        event: bytes,
        model: str = "",
        usage: common_pb2.Usage | None = None,
        error: common_pb2.RunError | None = None,
    ) -> int:
        """End a run with its terminal event; returns the event's seq."""
        seq = await conn.fetchval(
            f"""
            WITH upd AS (
                UPDATE gateway.runs SET status = $2, ended_at = now(), last_seq = last_seq + 1,
                    model = coalesce(nullif($4, ''), model),
                    input_tokens = $5, output_tokens = $6, error = $7,
                    worker_id = NULL, lease_expires_at = NULL
                WHERE id = $1 AND status IN ('queued', 'running')
                RETURNING id, last_seq
            ), ev AS (
                INSERT INTO gateway.run_events (run_id, seq, data) SELECT id, last_seq, $3 FROM upd
            )
            SELECT last_seq FROM upd, LATERAL (
                SELECT pg_notify('{EVENTS_CHANNEL}', upd.id::text || ':' || upd.last_seq),
                       pg_notify('{QUEUE_CHANNEL}', '')
            ) n
            """,
            run_id,
            status,
            event,
            model,
            usage.input_tokens if usage else 0,
            usage.output_tokens if usage else 0,
            error.SerializeToString() if error is not None else None,
        )
        if seq:  # lifecycle events (run.completed + message.sent, or run.failed), same transaction
            row = await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = $1", run_id)
            await emit_run_events(conn, [row], source=self.gateway_id, run_event=event)
        return int(seq or 0)

    async def cancel(self, org_id: str, run_id: uuid.UUID, reason: str) -> asyncpg.Record:
        """Cancel a run: a queued run ends at once; a running one is asked to stop.

        Raises:
            NotFound: no such run in this org.
        """
        cancelled = event_bytes(cancelled=common_pb2.RunCancelled(reason=reason or "cancelled by the client"))
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT id, status, epoch, gateway_id FROM gateway.runs WHERE id = $1 AND org_id = $2 FOR UPDATE",
                run_id,
                org_id,
            )
            if row is None:
                raise NotFound(f"run {run_id} not found", reason="RUN_NOT_FOUND", field="run_id")
            if row["status"] == "queued":
                if await self.finish(conn, run_id, status="cancelled", event=cancelled):
                    metrics.RUNS_TOTAL.labels("cancelled").inc()
            elif row["status"] == "running":
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
            return await conn.fetchrow(f"SELECT {_RUN_COLUMNS} FROM gateway.runs WHERE id = $1", run_id)

    async def record_worker_seq(self, run_id: uuid.UUID, epoch: int, worker_seq: int) -> None:
        """Remember the highest worker_seq persisted for the run's epoch."""
        await self.pool.execute(
            "UPDATE gateway.runs SET worker_seq = greatest(worker_seq, $3) WHERE id = $1 AND epoch = $2",
            run_id,
            epoch,
            worker_seq,
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

    async def events_after(self, run_id: uuid.UUID, after_seq: int, limit: int = 500) -> list[asyncpg.Record]:
        """Persisted events of a run with seq > after_seq, in order."""
        return await self.pool.fetch(
            "SELECT seq, data FROM gateway.run_events WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
            run_id,
            after_seq,
            limit,
        )

    async def status(self, run_id: uuid.UUID) -> str | None:
        return await self.pool.fetchval("SELECT status FROM gateway.runs WHERE id = $1", run_id)

    async def queue_depth(self) -> int:
        return int(await self.pool.fetchval("SELECT count(*) FROM gateway.runs WHERE status = 'queued'"))
