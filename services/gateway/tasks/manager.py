"""Background tasks (DESIGN.md section 7): child sessions with their own runs,
per-key concurrency, batched parent notifications, cascade cancel, timeouts.

A task is a row of ``gateway.tasks`` plus a child session (key
``task:<task id>``, linked to the parent) whose runs go through the ordinary
runs queue (:class:`~runyard.gateway.runs.RunStore`) with ``task_id`` set.
Everything that decides what happens to a task is a transaction on
PostgreSQL, so any gateway replica may do it and a restart loses nothing.

**Statuses and lifecycle events.** PENDING (waiting for a slot) -> RUNNING
(its run is queued or executing) -> COMPLETED, ERROR, CANCELLED or
INTERRUPTED. Each change is written to the gateway outbox in the same
transaction: ``task.spawned`` (PENDING), ``task.started`` (RUNNING: the
first attempt and every retry, ``Task.attempt`` says which) and
``task.completed`` (any terminal status; ``Task.status`` says which, as
``run.failed`` does for cancelled runs). Events carry the task without its
prompt and result (GetTask has them).

**Concurrency.** A task's key is ``model:<provider/model>`` when
``tasks.concurrency.models`` names its model, else ``provider:<name>`` when
``tasks.concurrency.providers`` names its provider, else ``default``; the
key's limit (0 = unlimited) bounds the tasks holding a slot. Waiters are
taken in spawn order (``queue_pos``) under a transaction-scoped advisory lock
per key, so the queue is first-in first-out across replicas. A slot is
freed in the transaction that ends the task (or its run) and handed to the
next waiter in that same transaction.

**Runs.** Granting a slot queues the task's run in the same transaction
(``RunStore.insert(conn=...)``). When the run ends (level-triggered: the
manager looks for RUNNING tasks whose run is terminal) the task completes,
or is retried (a retryable failure, up to ``tasks.max_attempts``; the retry
excludes the models that failed and are still cooling down according to the
router, and ``attempt`` only goes up), or ends ERROR / INTERRUPTED. A task
whose run completed while it has subtasks keeps RUNNING without a slot;
once they ended it takes a slot again and continues with a follow-up run
that carries their notification.

**Notifications.** An ended task is ``notify_state = 'pending'``. Tasks of
one parent that end within ``tasks.notify_batch_window_ms`` of the first are
batched into one system message (``gateway.task_notifications``); when no
sibling is left pending or running the batch is sent at once and says that
all tasks are complete and how many failed. Such a final message starts a
run of the parent unless the parent has an active run; otherwise, and for
the other messages, the notification rides along with the parent's next
claimed run (:meth:`TaskManager.prepare`, the dispatcher's hook): it is
appended to that run's input and stored in its payload in one transaction.
It counts as delivered once that run completed (its snapshot, holding the
message, is committed); if the run fails it goes back to pending. Each
notification is delivered exactly once.

**Cascade.** Deleting or resetting a session (through the gateway, or any
``session.end`` DELETED/RESET the gateway relays) cancels every pending or
running task below it, at any depth, frees their slots and cancels their
runs. A task that ends other than COMPLETED takes its subtasks with it.

**Timeouts.** A task PENDING for ``tasks.queue_ttl_s`` or RUNNING with no
run event (nor other progress) for ``tasks.stale_after_s`` ends ERROR
(``TASK_QUEUE_TTL_EXPIRED`` / ``TASK_STALE``) and notifies its parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import grpc

from runyard._proto.v1 import (
    common_pb2,
    router_pb2,
    router_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
    tasks_pb2,
    tasks_pb2_grpc,
)
from runyard.common import metrics
from runyard.common.auth import RunClaims, RunTokenVerifier, check_internal, internal_metadata
from runyard.common.clients import call, internal_channel
from runyard.common.config import Config
from runyard.common.outbox import HORIZON_SQL
from runyard.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RunyardError,
)
from runyard.common.pagination import decode_time_cursor, page_size, time_cursor_page
from runyard.common.protoutil import now, parse_uuid, timestamp
from runyard.gateway.hub import Dispatcher
from runyard.gateway.runs import Claim, RunStore, decode_batch
from runyard.gateway.watch import OUTBOX

__all__ = [
    "ACTIVE",
    "TERMINAL",
    "TaskManager",
    "TaskServicer",
    "concurrency_key",
    "normalise_notice",
    "notification_message",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

ACTIVE = ("pending", "running")
TERMINAL = ("completed", "error", "cancelled", "interrupted")
_STATUS = {
    "pending": common_pb2.TASK_STATUS_PENDING,
    "running": common_pb2.TASK_STATUS_RUNNING,
    "completed": common_pb2.TASK_STATUS_COMPLETED,
    "error": common_pb2.TASK_STATUS_ERROR,
    "cancelled": common_pb2.TASK_STATUS_CANCELLED,
    "interrupted": common_pb2.TASK_STATUS_INTERRUPTED,
}
_MAX_DESCRIPTION = 500
_MAX_IDEMPOTENCY_KEY = 255
_BATCH = 100
#: Run events read per ended run for its failover notices.
_MAX_EVENTS_SCANNED = 20_000
#: A task's session key is the prefix and the task id.
_TASK_KEY_PREFIX = "task:"

_COLUMNS = (
    "id, org_id, parent_session_id, parent_session_key, parent_agent_id, parent_task_id, depth, session_id, "
    "session_key, agent_id, description, prompt, model, max_tool_calls, concurrency_key, status, queue_pos, "
    "slot_held, wants_slot, run_id, attempt, runs_completed, exclude_models, result, error, idempotency_key, "
    "request_hash, created_at, started_at, ended_at, progress_at, notify_state, notification_id, reported_complete"
)

# ---------------------------------------------------------------- pure helpers


def concurrency_key(config: Config, model_ref: str) -> str:
    """The concurrency key of a task running ``model_ref`` ("provider/model"):
    ``model:<ref>``, else ``provider:<name>``, else ``default``."""
    concurrency = config.tasks.concurrency
    if model_ref in concurrency.models:
        return f"model:{model_ref}"
    provider = model_ref.split("/", 1)[0]
    if provider in concurrency.providers:
        return f"provider:{provider}"
    return "default"


def slot_limit(config: Config, key: str) -> int:
    """Slots of ``key`` (0 = unlimited)."""
    concurrency = config.tasks.concurrency
    kind, _, name = key.partition(":")
    if kind == "model" and name in concurrency.models:
        return concurrency.models[name]
    if kind == "provider" and name in concurrency.providers:
        return concurrency.providers[name]
    return concurrency.default


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_SPACE = re.compile(r"\s+")


def normalise_notice(text: str) -> str:
    """A notice with what varies between repeats of the same problem (ids,
    numbers such as Retry-After seconds, case, spacing) folded away."""
    folded = _UUID.sub("<id>", text.lower())
    folded = _NUMBER.sub("<n>", folded)
    return _SPACE.sub(" ", folded).strip()


def _excerpt(text: str, limit: int) -> str:
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: max(limit - 1, 1)].rstrip() + "…"


def _seconds(delta: dt.timedelta) -> str:
    value = max(delta.total_seconds(), 0.0)
    return f"{value:.1f} s" if value < 60 else f"{value / 60:.1f} min"


def _error_of(row: Any) -> common_pb2.RunError:
    error = common_pb2.RunError()
    if row["error"] is not None:
        error.ParseFromString(bytes(row["error"]))
    return error


def notification_message(
    tasks: Sequence[Any],
    *,
    notification_id: uuid.UUID,
    result_chars: int,
    totals: tuple[int, int, int] | None,
) -> common_pb2.Message:
    """The system message telling a parent about ended ``tasks``.

    Args:
        tasks: ``gateway.tasks`` rows (id, description, status, result,
            error, created_at, ended_at), in the order they ended.
        notification_id: becomes the message id.
        result_chars: longest result or error excerpt quoted per task.
        totals: ``(tasks, failed, cancelled)`` of the parent's round when no
            sibling is left (the message then says all tasks are complete),
            else None.
    """
    count = len(tasks)
    lines = [f"Background task update: {count} task{'s' if count != 1 else ''} finished."]
    for row in tasks:
        status = row["status"].upper()
        took = _seconds(row["ended_at"] - row["created_at"])
        line = f'- Task {row["id"]} "{row["description"]}": {status} after {took}.'
        if row["status"] == "completed":
            line += f" Result: {_excerpt(row['result'], result_chars) or '(empty)'}"
        else:
            line += f" Error: {_excerpt(_error_of(row).message or row['result'], result_chars)}"
        lines.append(line)
    if totals is not None:
        total, failed, cancelled = totals
        detail = f"{total} task{'s' if total != 1 else ''}; {failed} failed"
        if cancelled:
            detail += f", {cancelled} cancelled"
        lines.append(f"All background tasks are complete ({detail}).")
    message = common_pb2.Message(
        id=str(notification_id),
        role=common_pb2.ROLE_SYSTEM,
        name="runyard.tasks",
        content="\n".join(lines),
        metadata={
            "runyard.notification": "tasks",
            "task_ids": ",".join(str(r["id"]) for r in tasks),
            "all_complete": "true" if totals is not None else "false",
        },
    )
    message.create_time.CopyFrom(now())
    return message


async def _xact_lock(conn: asyncpg.Connection, name: str) -> None:
    """Take the transaction-scoped advisory lock ``name`` (safe with pooled connections)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", name)


async def _pending_notes(conn: asyncpg.Connection, org_id: str, key: str, *, skip_locked: bool = False) -> list[Any]:
    """Lock the pending notifications for session key ``key``, oldest first."""
    return list(await conn.fetch(
        "SELECT id, message, failed_deliveries FROM gateway.task_notifications "
        "WHERE org_id = $1 AND parent_session_key = $2 AND state = 'pending' "
        f"ORDER BY created_at FOR UPDATE{' SKIP LOCKED' if skip_locked else ''}",
        org_id,
        key,
    ))


async def _attach(conn: asyncpg.Connection, notes: Sequence[Any], run_id: uuid.UUID) -> None:
    """Mark ``notes`` as carried by run ``run_id`` (delivered once it completes)."""
    if notes:
        await conn.execute(
            "UPDATE gateway.task_notifications SET state = 'attached', run_id = $2 WHERE id = ANY($1::uuid[])",
            [n["id"] for n in notes],
            run_id,
        )


def _messages(notes: Sequence[Any]) -> list[common_pb2.Message]:
    return [common_pb2.Message.FromString(bytes(n["message"])) for n in notes]


def _request_fingerprint(parts: Iterable[str]) -> bytes:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.digest()


# ---------------------------------------------------------------- manager


@dataclass(slots=True)
class _Effects:
    """What to do once a transaction committed."""

    cancel_runs: list[tuple[str, uuid.UUID, str]] = field(default_factory=list)
    #: Keys that freed a slot: granted before the transaction commits.
    grant_keys: set[str] = field(default_factory=set)
    runs_queued: bool = False
    events: bool = False
    changed: bool = False

    def merge(self, other: _Effects) -> None:
        self.cancel_runs += other.cancel_runs
        self.grant_keys |= other.grant_keys
        self.runs_queued |= other.runs_queued
        self.events |= other.events
        self.changed |= other.changed


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """A request to spawn a task (public API or the ``spawn_task`` tool)."""

    parent_session_id: str = ""
    parent_session_key: str = ""
    agent_id: str = ""
    prompt: str = ""
    description: str = ""
    model: str = ""
    max_tool_calls: int = 0
    idempotency_key: str = ""


class TaskManager:
    """Background tasks: the API behind SpawnTask/ListTasks/GetTask/CancelTask
    and the ``TaskService``, the dispatcher hook that delivers notifications,
    and the loop that moves tasks along (see the module docstring).

    Args:
        config: the configuration (``[tasks]``, agents, providers).
        pool: the gateway's pool.
        runs: the runs queue.
        dispatcher: woken when runs are queued; cancels runs on this gateway.
        sessions: the sessions service (child sessions, parent checks).
        gateway_id: this gateway (lifecycle events' ``source``).
        router: the router's stub for ``GetProviderStatus`` (cooldowns of
            failed models before a retry); None = treat every model that
            failed as still cooling down.
    """

    def __init__(
        self,
        config: Config,
        pool: asyncpg.Pool,
        runs: RunStore,
        dispatcher: Dispatcher,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        *,
        gateway_id: str,
        router: router_pb2_grpc.RouterServiceStub | None = None,
    ):
        self.config = config
        self.cfg = config.tasks
        self.pool = pool
        self.runs = runs
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.router = router
        self.gateway_id = gateway_id
        self.metadata = internal_metadata(config.auth.internal_secret)
        self._wake = asyncio.Event()
        self._gauge_keys: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        #: Where check_parents() resumes (it walks parent ids in order, a batch per sweep).
        self._parent_cursor = uuid.UUID(int=0)
        #: No task is active and no notification is open anywhere (as of the
        #: last full sweep, or until something here changes): run changes and
        #: claims then cost nothing. Another replica's spawn is seen at the
        #: next full sweep (``tasks.sweep_interval_ms``).
        self._idle = False
        #: A phase of the current step failed (see _guarded).
        self._failed = False

    # ------------------------------------------------------------ protos and events

    async def _notices(self, conn: asyncpg.Connection | asyncpg.Pool, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Any]]:
        rows = await conn.fetch(
            "SELECT task_id, attempt, message, created_at FROM gateway.task_notices "
            "WHERE task_id = ANY($1::uuid[]) ORDER BY id",
            list(ids),
        )
        out: dict[uuid.UUID, list[Any]] = {}
        for row in rows:
            out.setdefault(row["task_id"], []).append(row)
        return out

    @staticmethod
    def task_proto(row: Any, notices: Sequence[Any] = ()) -> common_pb2.Task:
        """A ``Task`` message from a ``gateway.tasks`` row."""
        task = common_pb2.Task(
            id=str(row["id"]),
            parent_session_id=str(row["parent_session_id"]),
            session_id=str(row["session_id"]),
            session_key=row["session_key"],
            agent_id=row["agent_id"],
            status=_STATUS[row["status"]],
            description=row["description"],
            prompt=row["prompt"],
            model=row["model"],
            result=row["result"],
            parent_task_id=str(row["parent_task_id"] or ""),
            run_id=str(row["run_id"] or ""),
            max_tool_calls=row["max_tool_calls"],
            concurrency_key=row["concurrency_key"],
            attempt=row["attempt"],
            depth=row["depth"],
            exclude_models=list(row["exclude_models"] or ()),
            create_time=timestamp(row["created_at"]),
        )
        if row["started_at"] is not None:
            task.start_time.CopyFrom(timestamp(row["started_at"]))
        if row["ended_at"] is not None:
            task.end_time.CopyFrom(timestamp(row["ended_at"]))
        if row["error"] is not None:
            task.error.ParseFromString(bytes(row["error"]))
        for notice in notices:
            task.notices.add(attempt=notice["attempt"], message=notice["message"], time=timestamp(notice["created_at"]))
        return task

    def _event(self, row: Any, kind: str) -> common_pb2.LifecycleEvent:
        # Like message events (which carry a length), no conversation text:
        # the prompt and result are read with GetTask. Each is up to
        # gateway.max_text_bytes, and every event is kept and replayed.
        task = self.task_proto(row)
        task.ClearField("prompt")
        task.ClearField("result")
        return common_pb2.LifecycleEvent(
            type=kind,
            time=now(),
            org_id=row["org_id"],
            session_id=str(row["session_id"]),
            session_key=row["session_key"],
            agent_id=row["agent_id"],
            run_id=str(row["run_id"] or ""),
            task_id=str(row["id"]),
            source=self.gateway_id,
            task=common_pb2.TaskLifecycleData(task=task),
        )

    async def _emit(self, conn: asyncpg.Connection, rows: Iterable[Any], kind: str, effects: _Effects) -> None:
        events = [self._event(row, kind) for row in rows]
        if events:
            await OUTBOX.emit(conn, events)
            effects.events = True

    # ------------------------------------------------------------ public API

    def _validate(self, request: SpawnRequest) -> tuple[str, str]:
        """Check a spawn request; returns ``(description, model ref or "")``."""
        if not request.prompt.strip():
            raise InvalidArgument("prompt must not be empty", reason="EMPTY_PROMPT", field="prompt")
        size = len(request.prompt.encode("utf-8"))
        limit = self.config.gateway.max_text_bytes
        if size > limit:
            raise InvalidArgument(
                f"prompt is {size} bytes; the limit is {limit} (gateway.max_text_bytes)",
                reason="TEXT_TOO_LONG",
                field="prompt",
            )
        description = request.description.strip()
        if len(description) > _MAX_DESCRIPTION:
            raise InvalidArgument(
                f"description is {len(description)} characters; the limit is {_MAX_DESCRIPTION}",
                reason="DESCRIPTION_TOO_LONG",
                field="description",
            )
        if not description:
            description = _excerpt(request.prompt.strip().splitlines()[0], 80)
        if request.model:
            provider = request.model.split("/", 1)[0]
            if "/" not in request.model or provider not in self.config.providers:
                raise InvalidArgument(
                    f"model {request.model!r} must be 'provider/model' with a configured provider",
                    reason="UNKNOWN_MODEL",
                    field="model",
                )
        if request.max_tool_calls > self.cfg.max_tool_calls_limit:
            raise InvalidArgument(
                f"max_tool_calls is {request.max_tool_calls}; the limit is {self.cfg.max_tool_calls_limit} "
                "(tasks.max_tool_calls_limit)",
                reason="MAX_TOOL_CALLS_TOO_LARGE",
                field="max_tool_calls",
            )
        if request.agent_id and request.agent_id not in self.config.agents:
            raise NotFound(f"agent {request.agent_id!r} is not configured", reason="AGENT_NOT_FOUND", field="agent_id")
        if len(request.idempotency_key) > _MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency_key is longer than {_MAX_IDEMPOTENCY_KEY} characters",
                reason="IDEMPOTENCY_KEY_TOO_LONG",
                field="idempotency_key",
            )
        if request.parent_session_id:
            parse_uuid(request.parent_session_id, "parent_session_id", what="session id")
        elif not request.parent_session_key:
            raise InvalidArgument(
                "parent_session_id or parent_session_key is required", reason="MISSING_FIELD", field="parent_session_id"
            )
        return description, request.model

    async def _parent(self, org_id: str, session_id: str, session_key: str, timeout: float | None) -> common_pb2.Session:
        response = await call(
            self.sessions.GetSession(
                sessions_pb2.SessionServiceGetSessionRequest(org_id=org_id, session_id=session_id, session_key=session_key),
                metadata=self.metadata,
                timeout=timeout,
            )
        )
        return response.session

    async def _existing(self, conn: asyncpg.Connection | asyncpg.Pool, org_id: str, key: str, fingerprint: bytes) -> Any:
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM gateway.tasks WHERE org_id = $1 AND idempotency_key = $2", org_id, key
        )
        if row is not None and row["request_hash"] is not None and bytes(row["request_hash"]) != fingerprint:
            raise InvalidArgument(
                f"idempotency_key was already used for task {row['id']} with a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                field="idempotency_key",
                metadata={"task_id": str(row["id"])},
            )
        return row

    async def spawn(
        self, org_id: str, request: SpawnRequest, *, fingerprint: bytes = b"", timeout: float | None = 10.0
    ) -> common_pb2.Task:
        """Spawn a task under a parent session; it starts at once if its key has a free slot.

        Returns:
            The task (PENDING, or RUNNING when it got a slot). An idempotent
            repeat returns the task created first.

        Raises:
            InvalidArgument: empty or oversized prompt, bad description, model,
                max_tool_calls or parent id; idempotency key reused with a
                different request.
            NotFound: parent session (other orgs' look the same) or agent unknown.
            FailedPrecondition: the parent session has ended
                (PARENT_SESSION_ENDED) or is the session of a task that has
                ended (PARENT_TASK_ENDED).
            ResourceExhausted: nesting deeper than ``tasks.max_depth``
                (TASK_DEPTH_EXCEEDED) or the parent already has
                ``tasks.max_active_per_parent`` active tasks (TOO_MANY_TASKS).
        """
        description, model = self._validate(request)
        fingerprint = fingerprint or _request_fingerprint(
            [request.parent_session_id, request.parent_session_key, request.agent_id, request.prompt,
             request.description, request.model, str(request.max_tool_calls)]
        )
        key = request.idempotency_key or None
        if key is not None:
            existing = await self._existing(self.pool, org_id, key, fingerprint)
            if existing is not None:
                return await self.get(org_id, existing["id"])
        parent = await self._parent(org_id, request.parent_session_id, request.parent_session_key, timeout)
        if parent.HasField("end_time"):
            raise FailedPrecondition(
                f"parent session {parent.id} has ended; spawn tasks under the key's current session",
                reason="PARENT_SESSION_ENDED",
                field="parent_session_id",
            )
        parent_id = uuid.UUID(parent.id)
        parent_task = await self.pool.fetchrow(
            "SELECT id, status, depth FROM gateway.tasks WHERE session_id = $1 AND org_id = $2", parent_id, org_id
        )
        depth = 1
        if parent_task is not None:
            if parent_task["status"] in TERMINAL:
                raise FailedPrecondition(
                    f"the parent session belongs to task {parent_task['id']}, which has ended ({parent_task['status']})",
                    reason="PARENT_TASK_ENDED",
                    field="parent_session_id",
                )
            depth = parent_task["depth"] + 1
        if depth > self.cfg.max_depth:
            raise ResourceExhausted(
                f"a task at depth {depth} is deeper than tasks.max_depth ({self.cfg.max_depth})",
                reason="TASK_DEPTH_EXCEEDED",
            )
        await self._check_active(self.pool, parent_id)
        agent_id = request.agent_id or parent.agent_id or self.config.gateway.default_agent
        agent = self.config.agent(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} is not configured", reason="AGENT_NOT_FOUND", field="agent_id")
        ckey = concurrency_key(self.config, model or agent.model)
        task_id = uuid.uuid4()
        session_key = f"{_TASK_KEY_PREFIX}{task_id}"
        child = await call(
            self.sessions.ResolveSession(
                sessions_pb2.ResolveSessionRequest(
                    org_id=org_id, session_key=session_key, agent_id=agent_id, parent_session_id=parent.id
                ),
                metadata=self.metadata,
                timeout=timeout,
            )
        )
        effects = _Effects()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # One spawn at a time per parent: the active count and the
                # idempotency check below hold.
                await _xact_lock(conn, f"runyard.tasks.parent:{parent_id}")
                if key is not None:
                    existing = await self._existing(conn, org_id, key, fingerprint)
                    if existing is not None:
                        raise _Duplicate(existing["id"])
                if parent_task is not None:
                    # The parent task must not end while its subtask is being
                    # added (its run's end checks for subtasks under this lock).
                    status = await conn.fetchval(
                        "SELECT status FROM gateway.tasks WHERE id = $1 FOR SHARE", parent_task["id"]
                    )
                    if status in TERMINAL:
                        raise FailedPrecondition(
                            f"the parent session belongs to task {parent_task['id']}, which has ended ({status})",
                            reason="PARENT_TASK_ENDED",
                            field="parent_session_id",
                        )
                await self._check_active(conn, parent_id)
                row = await conn.fetchrow(
                    f"""
                    INSERT INTO gateway.tasks (id, org_id, parent_session_id, parent_session_key, parent_agent_id,
                        parent_task_id, depth, session_id, session_key, agent_id, description, prompt, model,
                        max_tool_calls, concurrency_key, status, idempotency_key, request_hash, progress_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'pending', $16, $17, now())
                    RETURNING {_COLUMNS}
                    """,
                    task_id,
                    org_id,
                    parent_id,
                    parent.key,
                    parent.agent_id,
                    parent_task["id"] if parent_task is not None else None,
                    depth,
                    uuid.UUID(child.session.id),
                    session_key,
                    agent_id,
                    description,
                    request.prompt,
                    model,
                    request.max_tool_calls,
                    ckey,
                    key,
                    fingerprint,
                )
                await self._emit(conn, [row], "task.spawned", effects)
                effects.grant_keys.add(ckey)
                await self._grant_freed(conn, effects)
        except (_Duplicate, RunyardError, asyncpg.PostgresError) as exc:
            await self._discard_session(org_id, child.session.id)
            if isinstance(exc, _Duplicate):
                return await self.get(org_id, exc.task_id)
            if isinstance(exc, asyncpg.UniqueViolationError) and key is not None:
                existing = await self._existing(self.pool, org_id, key, fingerprint)
                if existing is not None:
                    return await self.get(org_id, existing["id"])
            raise
        self._idle = False  # this replica has work again, whatever the last sweep saw
        await self._after(effects)
        log.info("task %s spawned under session %s (key %s)", task_id, parent_id, ckey)
        return await self.get(org_id, task_id)

    async def _check_active(self, conn: asyncpg.Connection | asyncpg.Pool, parent_id: uuid.UUID) -> None:
        active = await conn.fetchval(
            "SELECT count(*) FROM gateway.tasks WHERE parent_session_id = $1 AND status IN ('pending', 'running')",
            parent_id,
        )
        if active >= self.cfg.max_active_per_parent:
            raise ResourceExhausted(
                f"session {parent_id} already has {active} pending or running tasks "
                f"(tasks.max_active_per_parent = {self.cfg.max_active_per_parent})",
                reason="TOO_MANY_TASKS",
                retry_after_s=1.0,
            )

    async def _discard_session(self, org_id: str, session_id: str) -> None:
        """Delete a child session created for a task that was not created."""
        try:
            await call(
                self.sessions.DeleteSession(
                    sessions_pb2.SessionServiceDeleteSessionRequest(org_id=org_id, session_id=session_id),
                    metadata=self.metadata,
                    timeout=10,
                )
            )
        except RunyardError as exc:
            log.warning("could not delete unused task session %s: %s", session_id, exc.message)

    async def get(
        self, org_id: str, task_id: uuid.UUID, *, parent_session_key: str | None = None
    ) -> common_pb2.Task:
        """One task with its notices.

        ``parent_session_key`` limits the lookup to tasks spawned under that
        session key (the ``TaskService`` scope).

        Raises:
            NotFound: no such task in this org (TASK_NOT_FOUND, field task_id).
        """
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM gateway.tasks WHERE id = $1 AND org_id = $2 "
            "AND ($3::text IS NULL OR parent_session_key = $3)",
            task_id,
            org_id,
            parent_session_key,
        )
        if row is None:
            raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
        notices = await self._notices(self.pool, [row["id"]])
        return self.task_proto(row, notices.get(row["id"], ()))

    async def list(
        self, org_id: str, parent_session_id: uuid.UUID, size: int, token: str
    ) -> tuple[list[common_pb2.Task], str]:
        """One page of the tasks spawned under a session, oldest first."""
        limit = page_size(size)
        after = decode_time_cursor("tasks", token)
        rows = await self.pool.fetch(
            f"""
            SELECT {_COLUMNS} FROM gateway.tasks
            WHERE org_id = $1 AND parent_session_id = $2
              AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4))
            ORDER BY created_at, id LIMIT $5
            """,
            org_id,
            parent_session_id,
            after[0] if after else None,
            after[1] if after else None,
            limit + 1,
        )
        page, next_token = time_cursor_page("tasks", rows, limit)
        notices = await self._notices(self.pool, [r["id"] for r in page])
        return [self.task_proto(r, notices.get(r["id"], ())) for r in page], next_token

    async def cancel(self, org_id: str, task_id: uuid.UUID, reason: str = "") -> common_pb2.Task:
        """Cancel a task and every pending or running subtask below it.

        The task ends CANCELLED at once (its parent is notified), its slot
        goes to the next waiter and its run is cancelled. A task that has
        already ended is returned unchanged.

        Raises:
            NotFound: no such task in this org.
        """
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            exists = await conn.fetchval("SELECT 1 FROM gateway.tasks WHERE id = $1 AND org_id = $2", task_id, org_id)
            if exists is None:
                raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
            # Lock the whole subtree first (the same order as every cascade);
            # _end takes the subtasks along.
            rows = await self._tree(conn, "id = $2", org_id, task_id)
            root = [r for r in rows if r["id"] == task_id]
            message = f"cancelled by the client{': ' + reason if reason else ''}"
            error = common_pb2.RunError(code="CANCELLED", reason="TASK_CANCELLED", message=message)
            effects.merge(await self._end(conn, root, "cancelled", error=error, notify=True))
            await self._grant_freed(conn, effects)
        await self._after(effects)
        return await self.get(org_id, task_id)

    async def session_ended(self, org_id: str, session_ids: Sequence[str], reason: str) -> int:
        """Cascade for sessions that were deleted or reset (``reason`` DELETED
        or RESET): cancel every pending or running task below them, at any
        depth (their slots go to the next waiters, their runs are cancelled),
        and drop notifications no one will read. Idempotent.

        Returns how many tasks were cancelled.
        """
        ids = [uuid.UUID(s) for s in session_ids if s]
        if not ids:
            return 0
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            count = await self._cascade(conn, org_id, ids, reason, effects)
            await self._grant_freed(conn, effects)
        await self._after(effects)
        if count:
            log.info("cancelled %d task(s) below session(s) %s (%s)", count, ", ".join(map(str, ids)), reason.lower())
        return count

    async def _cascade(
        self, conn: asyncpg.Connection, org_id: str, ids: list[uuid.UUID], reason: str, effects: _Effects
    ) -> int:
        rows = await self._tree(
            conn, "(parent_session_id = ANY($2::uuid[]) OR session_id = ANY($2::uuid[]))", org_id, ids
        )
        what = "deleted" if reason == "DELETED" else "reset"
        # A task whose own session was deleted still has a parent to tell.
        own = [r for r in rows if r["session_id"] in ids and r["parent_session_id"] not in ids]
        own_ids = {r["id"] for r in own}
        rest = [r for r in rows if r["id"] not in own_ids]
        effects.merge(await self._end(
            conn, own, "cancelled", notify=True,
            error=common_pb2.RunError(code="CANCELLED", reason=f"TASK_SESSION_{reason}",
                                      message=f"the task's session was {what}"),
        ))
        effects.merge(await self._end(
            conn, rest, "cancelled", notify=False,
            error=common_pb2.RunError(code="CANCELLED", reason=f"PARENT_SESSION_{reason}",
                                      message=f"cancelled because its parent session was {what}"),
        ))
        # News for the ended sessions is read by no one: neither what is
        # batched nor what is not yet (notifications follow the session key,
        # so it would otherwise reach the key's next conversation).
        await conn.execute(
            "UPDATE gateway.tasks SET notify_state = 'skipped' "
            "WHERE org_id = $1 AND parent_session_id = ANY($2::uuid[]) AND notify_state = 'pending'",
            org_id,
            ids,
        )
        await conn.execute(
            "UPDATE gateway.task_notifications SET state = 'dropped' "
            "WHERE org_id = $1 AND parent_session_id = ANY($2::uuid[]) AND state = 'pending'",
            org_id,
            ids,
        )
        return len(rows)

    async def _tree(self, conn: asyncpg.Connection, roots: str, org_id: str, arg: Any) -> list[Any]:
        """Lock and return the active tasks matching ``roots`` (SQL over $2)
        and every active task below them, oldest first."""
        return list(await conn.fetch(
            f"""
            WITH RECURSIVE tree(id) AS (
                SELECT id FROM gateway.tasks WHERE org_id = $1 AND {roots}
                UNION
                SELECT t.id FROM gateway.tasks t JOIN tree ON t.parent_task_id = tree.id
            )
            SELECT {_COLUMNS} FROM gateway.tasks
            WHERE id IN (SELECT id FROM tree) AND status IN ('pending', 'running')
            ORDER BY queue_pos FOR UPDATE
            """,
            org_id,
            arg,
        ))

    # ------------------------------------------------------------ slots and runs

    async def _grant_freed(self, conn: asyncpg.Connection, effects: _Effects) -> None:
        """Grant the keys ``effects`` freed slots of (last step of a transaction)."""
        while effects.grant_keys:
            key = min(effects.grant_keys)
            effects.grant_keys.discard(key)
            effects.merge(await self._grant(conn, key))

    async def _grant(self, conn: asyncpg.Connection, key: str) -> _Effects:
        """Hand free slots of ``key`` to its oldest waiters (in ``conn``'s transaction)."""
        effects = _Effects()
        await _xact_lock(conn, f"runyard.tasks.slots:{key}")
        limit = slot_limit(self.config, key)
        free = _BATCH
        if limit:
            held = await conn.fetchval(
                "SELECT count(*) FROM gateway.tasks WHERE concurrency_key = $1 AND slot_held", key
            )
            free = min(limit - held, _BATCH)
            if free <= 0:
                return effects
        waiters = await conn.fetch(
            f"""
            SELECT {_COLUMNS} FROM gateway.tasks
            WHERE concurrency_key = $1 AND (status = 'pending' OR wants_slot)
            ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
            """,
            key,
            free,
        )
        for row in waiters:
            effects.merge(await self._start_run(conn, row))
        return effects

    async def _start_run(self, conn: asyncpg.Connection, row: Any, *, retry: bool = False) -> _Effects:
        """Queue the next run of task ``row`` and give it a slot.

        The first run answers the prompt; a retry repeats the input of the run
        that failed; a follow-up run (after subtasks ended) carries their
        notifications. A task whose run cannot be queued ends ERROR.
        """
        effects = _Effects(changed=True)
        await self._confirm_deliveries(conn, row["session_key"])
        notes = await _pending_notes(conn, row["org_id"], row["session_key"])
        text = row["prompt"] if row["runs_completed"] == 0 else ""
        if not text and not notes:
            # A follow-up with nothing to deliver: the task is done (it held
            # no slot, so there is nothing to hand over).
            done = await self._end(conn, [row], "completed", notify=True)
            done.grant_keys.clear()
            effects.merge(done)
            return effects
        attempt = row["attempt"] + 1
        run_id = uuid.uuid4()
        payload = common_pb2.RunPayload(
            run_id=str(run_id),
            org_id=row["org_id"],
            session_id=str(row["session_id"]),
            session_key=row["session_key"],
            agent_id=row["agent_id"],
            input=common_pb2.RunInput(text=text, messages=_messages(notes)),
            model=common_pb2.ModelPreferences(model=row["model"], exclude_models=list(row["exclude_models"] or ())),
            options=common_pb2.RunOptions(max_tool_calls=row["max_tool_calls"]),
            parent_session_id=str(row["parent_session_id"]),
            task_id=str(row["id"]),
            create_time=now(),
            idempotency_key=f"runyard.task:{row['id']}:{attempt}",
            metadata={"runyard.task_id": str(row["id"])},
        )
        try:
            inserted, _ = await self.runs.insert(
                payload, fingerprint=_request_fingerprint([payload.idempotency_key]), strategy="ENQUEUE", conn=conn
            )
        except RunyardError as exc:
            # The task's session refuses another run (its queue is full of
            # runs sent to it directly). The insert rolled back to its
            # savepoint; end the task rather than fail the caller's
            # transaction, which would block the key's queue for good.
            effects.merge(await self._end(conn, [row], "error", error=exc.to_run_error(), notify=True))
            return effects
        run_id = inserted["id"]  # the run queued first if this attempt's run already exists
        effects.runs_queued = True
        await _attach(conn, notes, run_id)
        updated = await conn.fetchrow(
            f"""
            UPDATE gateway.tasks SET status = 'running', slot_held = true, wants_slot = false, run_id = $2,
                attempt = $3, started_at = coalesce(started_at, clock_timestamp()), progress_at = now()
            WHERE id = $1 RETURNING {_COLUMNS}
            """,
            row["id"],
            run_id,
            attempt,
        )
        if row["status"] == "pending" or retry:
            await self._emit(conn, [updated], "task.started", effects)
        return effects

    async def _end(
        self,
        conn: asyncpg.Connection,
        rows: Sequence[Any],
        status: str,
        *,
        error: common_pb2.RunError | None = None,
        result: str | None = None,
        notify: bool,
    ) -> _Effects:
        """End active tasks ``rows`` (locked by the caller) with ``status``:
        free their slots (handed to the next waiters), write task.completed,
        queue the parent notification (``notify``), cancel their active runs
        after commit and, unless COMPLETED, cancel the subtasks below them."""
        effects = _Effects()
        ids = [r["id"] for r in rows if r["status"] in ACTIVE]
        if not ids:
            return effects
        effects.changed = True
        ended = await conn.fetch(
            f"""
            UPDATE gateway.tasks SET status = $2, ended_at = now(), slot_held = false, wants_slot = false,
                error = coalesce($3, error), result = coalesce($4, result),
                notify_state = CASE WHEN $5 THEN 'pending' ELSE 'skipped' END
            WHERE id = ANY($1::uuid[]) AND status IN ('pending', 'running')
            RETURNING {_COLUMNS}
            """,
            ids,
            status,
            error.SerializeToString() if error is not None else None,
            result if result is not None else (error.message if error is not None else None),
            notify,
        )
        if not ended:
            return effects
        await self._emit(conn, ended, "task.completed", effects)
        active_runs = await conn.fetch(
            "SELECT id, org_id FROM gateway.runs WHERE task_id = ANY($1::uuid[]) AND status IN ('queued', 'running')",
            ids,
        )
        why = error.message if error is not None else status
        effects.cancel_runs += [(r["org_id"], r["id"], why) for r in active_runs]
        await conn.execute(
            "UPDATE gateway.task_notifications SET state = 'dropped' "
            "WHERE parent_session_id = ANY($1::uuid[]) AND state = 'pending'",
            [r["session_id"] for r in ended],
        )
        if status != "completed":
            below = await self._tree(conn, "parent_task_id = ANY($2::uuid[])", ended[0]["org_id"], ids)
            below = [r for r in below if r["id"] not in ids]
            if below:
                parents = {r["id"]: r for r in ended}
                for row in below:
                    # Direct children name their parent; deeper ones are taken
                    # along by their own parent's end below.
                    if row["parent_task_id"] not in parents:
                        continue
                    effects.merge(await self._end(
                        conn, [row], "cancelled", notify=False,
                        error=common_pb2.RunError(
                            code="CANCELLED",
                            reason="PARENT_TASK_ENDED",
                            message=f"cancelled because its parent task {row['parent_task_id']} ended ({status})",
                        ),
                    ))
        # Freed slots go to the next waiters before the transaction commits
        # (the caller's _grant_freed), once every task it ends has ended.
        effects.grant_keys |= {r["concurrency_key"] for r in ended}
        for row in ended:
            log.info("task %s ended %s", row["id"], status)
        return effects

    async def _after(self, effects: _Effects) -> None:
        """Post-commit: cancel runs, wake the dispatcher and the loop."""
        for org_id, run_id, reason in effects.cancel_runs:
            try:
                row = await self.runs.cancel(org_id, run_id, f"task ended: {reason}"[:500])
            except NotFound:
                continue
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cancelling run %s of an ended task failed (%s); the sweep retries", run_id, exc)
                continue
            if row["status"] == "running":
                self.dispatcher.cancel_local(run_id)
        if effects.runs_queued:
            self.dispatcher.wake()
        if effects.changed:
            self._idle = False
            self._wake.set()
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.update_gauges()  # the sweep sets it again anyway

    # ------------------------------------------------------------ the dispatcher hook

    async def _busy(self) -> bool:
        """Whether any task is active or any notification is still open."""
        return bool(await self.pool.fetchval(
            """
            SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE status IN ('pending', 'running'))
                OR EXISTS (SELECT 1 FROM gateway.tasks WHERE notify_state = 'pending')
                OR EXISTS (SELECT 1 FROM gateway.task_notifications WHERE state IN ('pending', 'attached'))
            """
        ))

    async def prepare(self, claim: Claim, payload: common_pb2.RunPayload) -> None:
        """Deliver pending notifications with a claimed run of their parent
        (``Dispatcher.prepare``): append them to the run's input and store
        the run's payload with them, in one transaction. Free when idle."""
        if not payload.session_key or self._idle:
            return
        pending = await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM gateway.task_notifications "
            "WHERE org_id = $1 AND parent_session_key = $2 AND state = 'pending')",
            claim.org_id,
            payload.session_key,
        )
        if not pending:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            notes = await _pending_notes(conn, claim.org_id, payload.session_key, skip_locked=True)
            if not notes:
                return
            messages = _messages(notes)
            stored = common_pb2.RunPayload.FromString(claim.payload)
            stored.input.messages.extend(messages)
            updated = await conn.fetchval(
                "UPDATE gateway.runs SET payload = $2 WHERE id = $1 AND epoch = $3 AND status = 'running' RETURNING id",
                claim.run_id,
                stored.SerializeToString(),
                claim.epoch,
            )
            if updated is None:
                return
            await _attach(conn, notes, claim.run_id)
        payload.input.messages.extend(messages)
        log.info("run %s carries %d task notification(s)", claim.run_id, len(messages))

    # ------------------------------------------------------------ the loop

    def wake(self, *_: object) -> None:
        """Look at tasks soon (a run was queued or ended somewhere)."""
        self._wake.set()

    async def start(self) -> None:
        """Start the background loop."""
        self._task = asyncio.create_task(self.run(), name="tasks")

    async def close(self) -> None:
        """Stop the loop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Move tasks along until cancelled: on every wake-up, and every
        ``tasks.sweep_interval_ms`` also the timeouts and safety nets."""
        sweep_s = self.cfg.sweep_interval_ms / 1000
        last_sweep = 0.0
        next_due: float | None = None
        while True:
            timeout = sweep_s if next_due is None else max(min(sweep_s, next_due), 0.01)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            full = time.monotonic() - last_sweep >= sweep_s
            if full:
                last_sweep = time.monotonic()
            self._failed = False
            next_due = await self.step(full=full)
            if self._failed:
                await asyncio.sleep(min(sweep_s, 1.0))  # e.g. the database is down: do not spin

    async def _guarded(self, what: str, work: Awaitable[T]) -> T | None:
        """``await work``; a failure is logged (None) and noted, never raised: the loop must survive."""
        try:
            return await work
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RunyardError) as exc:
            log.warning("background tasks: %s failed: %s", what, exc)
        except Exception:
            log.exception("background tasks: %s failed", what)
        self._failed = True
        return None

    async def step(self, *, full: bool = True) -> float | None:
        """One pass; returns the seconds until the next notification batch is due (or None).

        A phase that fails is logged and the others still run (a sessions
        outage or one bad row must not stop notifications or the queue).
        """
        if full:
            was_idle = self._idle
            busy = await self._guarded("busy", self._busy())
            self._idle = busy is False
            if self._idle:
                # Nothing to move: only follow session ends (compaction renames
                # apply to ended tasks too) and zero the gauges once.
                await self._guarded("consume_session_ends", self.consume_session_ends())
                if not was_idle:
                    await self._guarded("update_gauges", self.update_gauges())
                return None
        elif self._idle:
            return None
        phases = [self.confirm_deliveries, self.reconcile]
        if full:
            phases += [self.expire, self.settle_waiting, self.cancel_orphan_runs, self.consume_session_ends,
                       self.check_parents, self.grant_all, self.update_gauges]
        for phase in phases:
            await self._guarded(phase.__name__, phase())
        next_due = await self._guarded("batch_notifications", self.batch_notifications())
        await self._guarded("deliver_notifications", self.deliver_notifications())
        return next_due

    # ------------------------------------------------------------ runs that ended

    async def reconcile(self) -> int:
        """Apply the outcome of every ended run of a RUNNING task; returns how many."""
        candidates = await self.pool.fetch(
            """
            SELECT t.id, r.status AS run_status FROM gateway.tasks t JOIN gateway.runs r ON r.id = t.run_id
            WHERE t.status = 'running' AND t.slot_held AND r.status IN ('completed', 'failed', 'cancelled')
            ORDER BY t.queue_pos LIMIT $1
            """,
            _BATCH,
        )
        if not candidates:
            return 0
        cooling: set[str] | None = None
        if any(c["run_status"] == "failed" for c in candidates):
            cooling = await self._cooling_models()
        done = 0
        for candidate in candidates:
            # One task that cannot be moved on must not hold up the others.
            done += bool(await self._guarded(f"task {candidate['id']}", self._reconcile_one(candidate["id"], cooling)))
        return done

    async def _reconcile_one(self, task_id: uuid.UUID, cooling: set[str] | None) -> bool:
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_COLUMNS} FROM gateway.tasks WHERE id = $1 AND status = 'running' AND slot_held "
                "FOR UPDATE SKIP LOCKED",
                task_id,
            )
            if row is None:
                return False
            run = await conn.fetchrow(
                "SELECT id, status, error, last_seq, cancel_reason FROM gateway.runs WHERE id = $1", row["run_id"]
            )
            if run is None or run["status"] not in ("completed", "failed", "cancelled"):
                return False
            effects = await self._run_ended(conn, row, run, cooling)
            await self._grant_freed(conn, effects)
        await self._after(effects)
        return True

    async def _run_events(self, conn: asyncpg.Connection, run_id: uuid.UUID) -> list[common_pb2.RunEvent]:
        """The run's first ``_MAX_EVENTS_SCANNED`` events (for its failovers)."""
        rows = await conn.fetch(
            "SELECT seq, data FROM gateway.run_events WHERE run_id = $1 AND seq <= $2 ORDER BY seq",
            run_id,
            _MAX_EVENTS_SCANNED,
        )
        events = [e for r in rows for e in decode_batch(run_id, "", r["seq"], bytes(r["data"]))]
        return events[:_MAX_EVENTS_SCANNED]

    async def _record_notices(self, conn: asyncpg.Connection, task_id: uuid.UUID, attempt: int, texts: Iterable[str]) -> int:
        """Store the distinct notices of one attempt; returns how many were new."""
        new = 0
        seen: set[str] = set()
        for text in texts:
            fingerprint = hashlib.sha256(normalise_notice(text).encode()).hexdigest()[:32]
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            status = await conn.execute(
                "INSERT INTO gateway.task_notices (task_id, attempt, fingerprint, message) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT DO NOTHING",
                task_id,
                attempt,
                fingerprint,
                text[:1000],
            )
            new += int(status.split()[-1])
        return new

    async def _run_ended(self, conn: asyncpg.Connection, row: Any, run: Any, cooling: set[str] | None) -> _Effects:
        events = await self._run_events(conn, run["id"])
        failovers = [e.model_failover for e in events if e.HasField("model_failover")]
        reasons = {v: k.removeprefix("FAILOVER_REASON_") for k, v in common_pb2.FailoverReason.items()}
        notices = [
            f"{f.from_model} -> {f.to_model} ({reasons.get(f.reason, 'UNKNOWN')}): {f.message}" for f in failovers
        ]
        attempt = row["attempt"]
        if run["status"] == "completed":
            await self._record_notices(conn, row["id"], attempt, notices)
            # The terminal event is the run's last (the scan above may stop short of it).
            chunk = await conn.fetchrow(
                "SELECT seq, data FROM gateway.run_events WHERE run_id = $1 AND seq <= $2 AND last_seq >= $2",
                run["id"],
                run["last_seq"],
            )
            stored = decode_batch(run["id"], "", chunk["seq"], bytes(chunk["data"])) if chunk is not None else []
            last = stored[-1] if stored else common_pb2.RunEvent()
            result = last.completed.message.content[: self.cfg.result_max_chars]
            busy = await conn.fetchval(
                """
                SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE parent_task_id = $1
                               AND (status IN ('pending', 'running') OR notify_state = 'pending'))
                    OR EXISTS (SELECT 1 FROM gateway.task_notifications
                               WHERE org_id = $2 AND parent_session_key = $3 AND state = 'pending')
                """,
                row["id"],
                row["org_id"],
                row["session_key"],
            )
            if busy:
                # Subtasks are still going (or their news is undelivered):
                # keep RUNNING, give the slot back, continue once they ended.
                await conn.execute(
                    "UPDATE gateway.tasks SET slot_held = false, result = $2, runs_completed = runs_completed + 1, "
                    "progress_at = now() WHERE id = $1",
                    row["id"],
                    result,
                )
                return _Effects(changed=True, grant_keys={row["concurrency_key"]})
            await conn.execute(
                "UPDATE gateway.tasks SET runs_completed = runs_completed + 1 WHERE id = $1", row["id"]
            )
            return await self._end(conn, [row], "completed", result=result, notify=True)
        if run["status"] == "cancelled":
            await self._record_notices(conn, row["id"], attempt, notices)
            why = run["cancel_reason"] or "cancelled"
            error = common_pb2.RunError(
                code="CANCELLED", reason="RUN_INTERRUPTED", message=f"the task's run was cancelled ({why.lower()})"
            )
            return await self._end(conn, [row], "interrupted", error=error, notify=True)
        error = _error_of(run)
        notices.append(f"attempt {attempt} failed: {error.reason}: {error.message}")
        await self._record_notices(conn, row["id"], attempt, notices)
        if error.reason == "ATTEMPTS_EXHAUSTED":
            # The run's worker was lost on every execution: interrupted, not failed.
            return await self._end(conn, [row], "interrupted", error=error, notify=True)
        # Attempts of this step: the runs since the task's last completed one.
        if not error.retryable or attempt - row["runs_completed"] >= self.cfg.max_attempts:
            return await self._end(conn, [row], "error", error=error, notify=True)
        failed = {f.from_model for f in failovers if f.from_model}
        if error.metadata.get("model"):
            failed.add(error.metadata["model"])
        failed |= set(row["exclude_models"] or ())
        # Never go back to a model that failed and is still cooling down
        # (when the router cannot be asked, to none that failed).
        exclude = sorted(failed if cooling is None else failed & cooling)
        chain = self._chain(row)
        left = [ref for ref in chain if ref not in exclude]
        if not left:
            message = (
                f"attempt {attempt} failed ({error.reason}: {error.message}) and every model of the task's chain "
                f"({', '.join(chain)}) failed and is still cooling down; not retrying"
            )
            error.message = message
            return await self._end(conn, [row], "error", error=error, notify=True)
        row = await conn.fetchrow(
            f"UPDATE gateway.tasks SET exclude_models = $2 WHERE id = $1 RETURNING {_COLUMNS}", row["id"], exclude
        )
        log.info("task %s: attempt %d failed (%s); retrying without %s", row["id"], attempt, error.reason,
                 ", ".join(exclude) or "no model excluded")
        return await self._start_run(conn, row, retry=True)

    def _chain(self, row: Any) -> list[str]:
        agent = self.config.agent(row["agent_id"])
        chain = list(agent.chain) if agent is not None else []
        if row["model"]:
            chain = [row["model"], *[m for m in chain if m != row["model"]]]
        return chain

    async def _cooling_models(self) -> set[str] | None:
        """Models ("provider/model") every auth profile of which is cooling
        down or disabled now, per the router; None if it cannot be asked."""
        if self.router is None:
            return None
        try:
            response = await call(
                self.router.GetProviderStatus(
                    router_pb2.GetProviderStatusRequest(), metadata=self.metadata, timeout=3.0
                )
            )
        except RunyardError as exc:
            log.warning("router status unavailable (%s); retries exclude every model that failed", exc.message)
            return None
        current = time.time()
        usable: dict[str, bool] = {}
        for state in response.states:
            if not state.model:
                continue
            ref = f"{state.provider}/{state.model}"
            blocked = state.health != router_pb2.PROVIDER_HEALTH_OK and (
                not state.HasField("until") or state.until.ToNanoseconds() / 1e9 > current
            )
            usable[ref] = usable.get(ref, False) or not blocked
        return {ref for ref, ok in usable.items() if not ok}

    # ------------------------------------------------------------ sweeps

    async def expire(self) -> int:
        """End tasks PENDING past ``tasks.queue_ttl_s`` or RUNNING with no
        progress for ``tasks.stale_after_s`` (ERROR); returns how many."""
        total = 0
        queue_ttl, stale = self.cfg.queue_ttl_s, self.cfg.stale_after_s
        for kind in ("queue", "stale"):
            effects = _Effects()
            async with self.pool.acquire() as conn, conn.transaction():
                if kind == "queue":
                    rows = await conn.fetch(
                        f"""
                        SELECT {_COLUMNS} FROM gateway.tasks
                        WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
                        ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
                        """,
                        queue_ttl,
                        _BATCH,
                    )
                else:
                    rows = await conn.fetch(
                        f"""
                        SELECT {_COLUMNS} FROM gateway.tasks t
                        WHERE status = 'running' AND (slot_held OR wants_slot)
                          AND greatest(progress_at, (SELECT e.created_at FROM gateway.run_events e
                                                     WHERE e.run_id = t.run_id ORDER BY e.seq DESC LIMIT 1))
                              < now() - make_interval(secs => $1)
                        ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
                        """,
                        stale,
                        _BATCH,
                    )
                for row in rows:
                    if kind == "queue":
                        error = common_pb2.RunError(
                            code="DEADLINE_EXCEEDED",
                            reason="TASK_QUEUE_TTL_EXPIRED",
                            message=(
                                f"the task waited {queue_ttl:g} s for a free '{row['concurrency_key']}' slot "
                                f"without starting (tasks.queue_ttl_s); it never ran"
                            ),
                        )
                    else:
                        error = common_pb2.RunError(
                            code="DEADLINE_EXCEEDED",
                            reason="TASK_STALE",
                            message=(
                                f"the task was running but made no progress for {stale:g} s (tasks.stale_after_s)"
                                + ("; its run was cancelled" if row["slot_held"] else "; it was waiting for a slot")
                            ),
                        )
                    effects.merge(await self._end(conn, [row], "error", error=error, notify=True))
                    log.warning("task %s: %s", row["id"], error.message)
                await self._grant_freed(conn, effects)
                total += len(rows)
            await self._after(effects)
        return total

    async def settle_waiting(self) -> int:
        """Complete RUNNING tasks that wait for nothing any more: no slot,
        no active subtask and no undelivered news (their subtasks' news
        reached the task's conversation with a run other than the task's
        own, e.g. a message sent to its session). Returns how many."""
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                f"""
                SELECT {_COLUMNS} FROM gateway.tasks t
                WHERE status = 'running' AND NOT slot_held AND NOT wants_slot
                  AND NOT EXISTS (SELECT 1 FROM gateway.tasks c WHERE c.parent_task_id = t.id
                                  AND (c.status IN ('pending', 'running') OR c.notify_state = 'pending'))
                  AND NOT EXISTS (SELECT 1 FROM gateway.task_notifications n
                                  WHERE n.org_id = t.org_id AND n.parent_session_key = t.session_key
                                    AND n.state IN ('pending', 'attached'))
                ORDER BY queue_pos LIMIT $1 FOR UPDATE SKIP LOCKED
                """,
                _BATCH,
            )
            if rows:
                effects.merge(await self._end(conn, rows, "completed", notify=True))
                await self._grant_freed(conn, effects)
        await self._after(effects)
        return len(rows)

    async def cancel_orphan_runs(self) -> int:
        """Cancel active runs of tasks that have ended (a cancel lost to a crash)."""
        rows = await self.pool.fetch(
            """
            SELECT r.id, r.org_id, t.status FROM gateway.runs r JOIN gateway.tasks t ON t.id = r.task_id
            WHERE r.task_id IS NOT NULL AND r.status IN ('queued', 'running') AND NOT r.cancel_requested
              AND t.status NOT IN ('pending', 'running')
            LIMIT $1
            """,
            _BATCH,
        )
        await self._after(_Effects(cancel_runs=[(r["org_id"], r["id"], f"task {r['status']}") for r in rows]))
        return len(rows)

    async def grant_all(self) -> None:
        """Hand free slots to waiters of every key (safety net; grants
        normally happen where a slot is freed)."""
        keys = await self.pool.fetch(
            "SELECT DISTINCT concurrency_key FROM gateway.tasks WHERE status = 'pending' OR wants_slot"
        )
        for key in keys:
            async with self.pool.acquire() as conn, conn.transaction():
                effects = await self._grant(conn, key["concurrency_key"])
            await self._after(effects)

    async def update_gauges(self) -> None:
        """``runyard_task_slots_in_use{key}`` from the shared table."""
        rows = await self.pool.fetch(
            "SELECT concurrency_key, count(*) AS n FROM gateway.tasks WHERE slot_held GROUP BY concurrency_key"
        )
        seen = {r["concurrency_key"]: r["n"] for r in rows}
        for key in self._gauge_keys | set(seen):
            metrics.TASK_SLOTS_IN_USE.labels(key).set(seen.get(key, 0))
        self._gauge_keys |= set(seen)

    async def check_parents(self) -> int:
        """Safety net for parents deleted without a ``session.end``: maintenance
        prunes an idle session, which has no open activation to end, so no
        event reaches the gateway. Asks sessions about up to ``_BATCH``
        parents of active tasks per sweep (rotating through them) and
        cascades for those it no longer knows, or knows as reset or deleted
        (a spawn that committed after the cascade). Returns how many tasks ended."""
        rows = await self.pool.fetch(
            """
            SELECT DISTINCT parent_session_id, org_id FROM gateway.tasks
            WHERE status IN ('pending', 'running') AND parent_session_id > $1
            ORDER BY parent_session_id LIMIT $2
            """,
            self._parent_cursor,
            _BATCH,
        )
        self._parent_cursor = rows[-1]["parent_session_id"] if len(rows) == _BATCH else uuid.UUID(int=0)
        ended = 0
        for row in rows:
            try:
                session = await self._parent(row["org_id"], str(row["parent_session_id"]), "", timeout=5.0)
            except NotFound:
                reason = "DELETED"
            except RunyardError as exc:
                log.warning("checking the parents of tasks failed (%s); retrying next sweep", exc.message)
                break
            else:
                # A reset whose cascade raced a spawn (and whose session.end was already consumed).
                if session.end_reason != common_pb2.SESSION_END_REASON_RESET:
                    continue
                reason = "RESET"
            ended += await self.session_ended(row["org_id"], [str(row["parent_session_id"])], reason)
        return ended

    async def consume_session_ends(self) -> int:
        """Cascade for every ``session.end`` DELETED or RESET that reached the
        gateway outbox (sessions deleted or reset by any path, e.g.
        maintenance), and follow compaction rollovers (tasks and their
        notifications move to the conversation's new session id). Returns
        how many events were read."""
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            after = await conn.fetchval(
                "SELECT after_pos FROM gateway.task_cursors WHERE name = 'session_end' FOR UPDATE SKIP LOCKED"
            )
            if after is None:
                return 0
            # Only positions every writer has finished with (runyard.common.outbox).
            top = await conn.fetchval(f"SELECT max(pos) FROM gateway.outbox WHERE pos < {HORIZON_SQL}")
            if top is None or top <= after:
                return 0
            rows = await conn.fetch(
                "SELECT pos, data FROM gateway.outbox WHERE pos > $1 AND pos <= $2 AND type = 'session.end' "
                "ORDER BY pos LIMIT $3",
                after,
                top,
                _BATCH * 5,
            )
            for row in rows:
                event = common_pb2.LifecycleEvent.FromString(bytes(row["data"]))
                reason = common_pb2.SessionEndReason.Name(event.session_end.reason).removeprefix("SESSION_END_REASON_")
                if not event.session_id:
                    continue
                if reason in ("DELETED", "RESET"):
                    await self._cascade(conn, event.org_id, [uuid.UUID(event.session_id)], reason, effects)
                elif reason == "COMPACTION" and event.session_end.next_session_id:
                    old, new = uuid.UUID(event.session_id), uuid.UUID(event.session_end.next_session_id)
                    await conn.execute(
                        "UPDATE gateway.tasks SET parent_session_id = $3 WHERE org_id = $1 AND parent_session_id = $2",
                        event.org_id, old, new,
                    )
                    await conn.execute(
                        "UPDATE gateway.tasks SET session_id = $3 WHERE org_id = $1 AND session_id = $2",
                        event.org_id, old, new,
                    )
                    await conn.execute(
                        "UPDATE gateway.task_notifications SET parent_session_id = $3 "
                        "WHERE org_id = $1 AND parent_session_id = $2 AND state IN ('pending', 'attached')",
                        event.org_id, old, new,
                    )
            await self._grant_freed(conn, effects)
            last = rows[-1]["pos"] if len(rows) == _BATCH * 5 else top
            await conn.execute(
                "UPDATE gateway.task_cursors SET after_pos = $1, updated_at = now() WHERE name = 'session_end'", last
            )
        await self._after(effects)
        return len(rows)

    # ------------------------------------------------------------ notifications

    async def batch_notifications(self) -> float | None:
        """Turn ended tasks into parent notifications: a parent's pending
        tasks become one message once the first of them ended
        ``notify_batch_window_ms`` ago, or at once when none of its tasks is
        left pending or running. Returns the seconds until the next batch
        is due (None if nothing waits)."""
        window = self.cfg.notify_batch_window_ms / 1000
        parents = await self.pool.fetch(
            """
            SELECT p.parent_session_id, extract(epoch FROM now() - p.first) AS age,
                   EXISTS (SELECT 1 FROM gateway.tasks a WHERE a.parent_session_id = p.parent_session_id
                           AND a.status IN ('pending', 'running')) AS busy
            FROM (SELECT parent_session_id, min(ended_at) AS first FROM gateway.tasks
                  WHERE notify_state = 'pending' GROUP BY parent_session_id) p
            """
        )
        next_due: float | None = None
        for parent in parents:
            age = float(parent["age"])
            if parent["busy"] and age < window:
                wait = window - age
                next_due = wait if next_due is None else min(next_due, wait)
                continue
            await self._batch(parent["parent_session_id"], window)
        return next_due

    async def _batch(self, parent_id: uuid.UUID, window: float) -> None:
        effects = _Effects()
        async with self.pool.acquire() as conn, conn.transaction():
            await _xact_lock(conn, f"runyard.tasks.notify:{parent_id}")
            tasks = await conn.fetch(
                f"""
                SELECT {_COLUMNS} FROM gateway.tasks WHERE parent_session_id = $1 AND notify_state = 'pending'
                ORDER BY ended_at, queue_pos FOR UPDATE
                """,
                parent_id,
            )
            if not tasks:
                return
            busy = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE parent_session_id = $1 "
                "AND status IN ('pending', 'running'))",
                parent_id,
            )
            first = min(t["ended_at"] for t in tasks)
            age = await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)", first)
            if busy and float(age) < window:
                return
            notification_id = uuid.uuid4()
            ids = [t["id"] for t in tasks]
            totals: tuple[int, int, int] | None = None
            if not busy:
                # The parent's round: every task reported since the last
                # "all complete" message, plus these.
                round_rows = await conn.fetch(
                    "UPDATE gateway.tasks SET reported_complete = true WHERE parent_session_id = $1 "
                    "AND NOT reported_complete AND (notify_state = 'batched' OR id = ANY($2::uuid[])) RETURNING status",
                    parent_id,
                    ids,
                )
                statuses = [r["status"] for r in round_rows]
                totals = (
                    len(statuses),
                    sum(1 for s in statuses if s in ("error", "interrupted")),
                    sum(1 for s in statuses if s == "cancelled"),
                )
            message = notification_message(
                tasks, notification_id=notification_id, result_chars=self.cfg.notify_result_chars, totals=totals
            )
            await conn.execute(
                """
                INSERT INTO gateway.task_notifications (id, org_id, parent_session_id, parent_session_key, message,
                    all_complete, state)
                VALUES ($1, $2, $3, $4, $5, $6, 'pending')
                """,
                notification_id,
                tasks[0]["org_id"],
                parent_id,
                tasks[-1]["parent_session_key"],
                message.SerializeToString(),
                totals is not None,
            )
            await conn.execute(
                "UPDATE gateway.tasks SET notify_state = 'batched', notification_id = $2 WHERE id = ANY($1::uuid[])",
                ids,
                notification_id,
            )
            effects.changed = True
        log.info(
            "notification %s for session %s: %d task(s)%s",
            notification_id, parent_id, len(ids), ", all complete" if totals is not None else "",
        )
        await self._after(effects)

    async def confirm_deliveries(self) -> None:
        """Notifications whose run completed are delivered; those whose run
        failed or was cancelled go back to pending."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._confirm_deliveries(conn, None)

    async def _confirm_deliveries(self, conn: asyncpg.Connection, session_key: str | None) -> None:
        await conn.execute(
            """
            UPDATE gateway.task_notifications n SET
                state = CASE WHEN r.status = 'completed' THEN 'delivered' ELSE 'pending' END,
                delivered_at = CASE WHEN r.status = 'completed' THEN now() END,
                run_id = CASE WHEN r.status = 'completed' THEN n.run_id END,
                failed_deliveries = n.failed_deliveries + CASE WHEN r.status = 'completed' THEN 0 ELSE 1 END
            FROM gateway.runs r
            WHERE n.state = 'attached' AND r.id = n.run_id AND r.status IN ('completed', 'failed', 'cancelled')
              AND ($1::text IS NULL OR n.parent_session_key = $1)
            """,
            session_key,
        )

    async def deliver_notifications(self) -> None:
        """Start the runs that deliver pending notifications: a follow-up of
        a parent task waiting for its subtasks, or a run of an ordinary
        parent session for an "all complete" message when the parent has no
        active run (otherwise its next run carries them)."""
        parents = await self.pool.fetch(
            """
            SELECT n.org_id, n.parent_session_key, (array_agg(n.parent_session_id ORDER BY n.created_at DESC))[1] AS
                   parent_session_id, bool_or(n.all_complete) AS final, max(n.failed_deliveries) AS failures
            FROM gateway.task_notifications n WHERE n.state = 'pending'
            GROUP BY n.org_id, n.parent_session_key
            -- Only what may start a run now; the rest waits for the parent's
            -- next run and must neither cost a query per pass nor crowd these out.
            HAVING n.parent_session_key LIKE $2
                OR (bool_or(n.all_complete) AND max(n.failed_deliveries) < $3)
            ORDER BY min(n.created_at)
            LIMIT $1
            """,
            _BATCH,
            f"{_TASK_KEY_PREFIX}%",
            self.cfg.max_notification_runs,
        )
        for parent in parents:
            try:
                await self._deliver(parent)
            except RunyardError as exc:
                log.warning("delivering task notifications to %s failed: %s", parent["parent_session_key"], exc.message)

    async def _deliver(self, parent: Any) -> None:
        org_id, key, parent_id = parent["org_id"], parent["parent_session_key"], parent["parent_session_id"]
        effects = _Effects()
        task = await self.pool.fetchrow(
            "SELECT id, status, slot_held, wants_slot, concurrency_key FROM gateway.tasks WHERE session_id = $1",
            parent_id,
        )
        if task is not None:
            if task["status"] in TERMINAL:
                await self._drop(org_id, "its task has ended", key=key)
                return
            async with self.pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    f"""
                    SELECT {_COLUMNS} FROM gateway.tasks t WHERE id = $1 AND status = 'running' AND NOT slot_held
                      AND NOT wants_slot
                      AND NOT EXISTS (SELECT 1 FROM gateway.tasks c WHERE c.parent_task_id = t.id
                                      AND (c.status IN ('pending', 'running') OR c.notify_state = 'pending'))
                    FOR UPDATE SKIP LOCKED
                    """,
                    task["id"],
                )
                if row is None:
                    return  # its run is active (it continues when that run ends) or subtasks are left
                await conn.execute(
                    "UPDATE gateway.tasks SET wants_slot = true, progress_at = now() WHERE id = $1", row["id"]
                )
                effects.changed = True
                effects.grant_keys.add(row["concurrency_key"])
                await self._grant_freed(conn, effects)
            await self._after(effects)
            return
        if not parent["final"] or parent["failures"] >= self.cfg.max_notification_runs:
            return  # delivered with the parent's next run
        busy = await self.pool.fetchval(
            "SELECT EXISTS (SELECT 1 FROM gateway.runs WHERE session_id = $1 AND status IN ('queued', 'running'))",
            parent_id,
        )
        if busy:
            return  # the parent's next claimed run carries them
        try:
            session = await self._parent(org_id, str(parent_id), "", 10.0)
        except NotFound:
            await self._drop(org_id, "the parent session no longer exists", parent_id=parent_id)
            return
        if session.HasField("end_time"):
            if session.end_reason != common_pb2.SESSION_END_REASON_COMPACTION:
                await self._drop(org_id, "the parent session has ended", parent_id=parent_id)
                return
            session = await self._parent(org_id, "", key, 10.0)
        session_id = uuid.UUID(session.id)
        async with self.pool.acquire() as conn, conn.transaction():
            await _xact_lock(conn, f"runyard.tasks.notify:{parent_id}")
            active = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM gateway.runs WHERE session_id = $1 AND status IN ('queued', 'running'))",
                session_id,
            )
            if active:
                return  # the parent's next claimed run carries them
            notes = await _pending_notes(conn, org_id, key)
            if not notes:
                return
            last = await conn.fetchrow(
                "SELECT payload FROM gateway.runs WHERE session_id = $1 ORDER BY created_at DESC LIMIT 1", session_id
            )
            options = common_pb2.RunOptions()
            if last is not None:
                options.CopyFrom(common_pb2.RunPayload.FromString(bytes(last["payload"])).options)
            run_id = uuid.uuid4()
            payload = common_pb2.RunPayload(
                run_id=str(run_id),
                org_id=org_id,
                session_id=str(session_id),
                session_key=key,
                agent_id=session.agent_id,
                input=common_pb2.RunInput(messages=_messages(notes)),
                options=options,
                create_time=now(),
                idempotency_key=f"runyard.task-notification:{notes[0]['id']}:{notes[0]['failed_deliveries']}",
                metadata={"runyard.trigger": "task_notification"},
            )
            inserted, _ = await self.runs.insert(
                payload, fingerprint=_request_fingerprint([payload.idempotency_key]), strategy="ENQUEUE", conn=conn
            )
            run_id = inserted["id"]
            await _attach(conn, notes, run_id)
            effects.runs_queued = True
        log.info("started run %s of session %s to deliver %d task notification(s)", run_id, session_id, len(notes))
        await self._after(effects)

    async def _drop(self, org_id: str, why: str, *, key: str = "", parent_id: uuid.UUID | None = None) -> None:
        """Drop the pending notifications for task session ``key``, or for
        session ``parent_id`` only (not its key's: they may be for the key's
        next conversation)."""
        column, value = ("parent_session_key", key) if key else ("parent_session_id", parent_id)
        status = await self.pool.execute(
            f"UPDATE gateway.task_notifications SET state = 'dropped' "
            f"WHERE org_id = $1 AND {column} = $2 AND state = 'pending'",
            org_id,
            value,
        )
        log.info("dropped %s task notification(s) for %s: %s", status.split()[-1], key or parent_id, why)


class _Duplicate(Exception):
    """An idempotent repeat found inside the spawn transaction."""

    def __init__(self, task_id: uuid.UUID):
        super().__init__(str(task_id))
        self.task_id = task_id


# ---------------------------------------------------------------- TaskService (workers)


class TaskServicer(tasks_pb2_grpc.TaskServiceServicer):
    """``runyard.v1.TaskService``: the built-in tools' access to tasks.

    Every call carries the internal credential and the run token of the run
    executing the tool; the token's run must be running at the token's
    epoch, and scopes the call: spawns go under its session, reads see the
    tasks spawned under its session key (so a conversation still finds its
    tasks after a compaction rolled it over to a new session id).
    """

    def __init__(self, manager: TaskManager, signer: RunTokenVerifier, *, internal_secret: str):
        self.manager = manager
        self.signer = signer
        self.internal_secret = internal_secret

    async def _run(self, context: grpc.aio.ServicerContext, token: str) -> tuple[RunClaims, str]:
        check_internal(context, self.internal_secret)
        claims = self.signer.verify(token)
        row = await self.manager.pool.fetchrow(
            "SELECT status, epoch, session_key FROM gateway.runs WHERE id = $1 AND org_id = $2",
            uuid.UUID(claims.run_id),
            claims.org_id,
        )
        if row is None or row["status"] != "running" or row["epoch"] != claims.epoch:
            raise FailedPrecondition(
                "the run token's run is not running at this epoch", reason="RUN_NOT_ACTIVE", field="run_token"
            )
        return claims, row["session_key"]

    async def SpawnTask(
        self, request: tasks_pb2.TaskServiceSpawnTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.TaskServiceSpawnTaskResponse:
        """Spawn a task under the token's session (see :meth:`TaskManager.spawn`).

        Raises:
            Unauthenticated: no service credential, or a missing, forged or
                expired run token.
            FailedPrecondition: the token's run is not running at its epoch
                (RUN_NOT_ACTIVE); plus every error of :meth:`TaskManager.spawn`.
        """
        claims, _ = await self._run(context, request.run_token)
        spawn = SpawnRequest(
            parent_session_id=claims.session_id,
            agent_id=request.agent_id,
            prompt=request.prompt,
            description=request.description,
            model=request.model,
            max_tool_calls=request.max_tool_calls,
            idempotency_key=request.idempotency_key,
        )
        # The key names one spawn of one run (its n-th spawn_task call): a run
        # that re-executes gets the task its lost execution spawned, even if
        # the model worded the call differently this time.
        fingerprint = hashlib.sha256(request.idempotency_key.encode()).digest() if request.idempotency_key else b""
        task = await self.manager.spawn(claims.org_id, spawn, fingerprint=fingerprint)
        return tasks_pb2.TaskServiceSpawnTaskResponse(task=task)

    async def GetTask(
        self, request: tasks_pb2.TaskServiceGetTaskRequest, context: grpc.aio.ServicerContext
    ) -> tasks_pb2.TaskServiceGetTaskResponse:
        """A task spawned under the token's session key.

        Raises:
            Unauthenticated, FailedPrecondition: as for :meth:`SpawnTask`.
            InvalidArgument: ``task_id`` is not an id (INVALID_ID).
            NotFound: no such task under the token's session key (TASK_NOT_FOUND).
        """
        claims, session_key = await self._run(context, request.run_token)
        task_id = parse_uuid(request.task_id, "task_id", what="task id")
        task = await self.manager.get(claims.org_id, task_id, parent_session_key=session_key)
        return tasks_pb2.TaskServiceGetTaskResponse(task=task)


def router_stub(config: Config) -> tuple[grpc.aio.Channel, router_pb2_grpc.RouterServiceStub]:
    """A channel and stub to the router for ``GetProviderStatus``."""
    channel = internal_channel(config.endpoints.router)
    return channel, router_pb2_grpc.RouterServiceStub(channel)
