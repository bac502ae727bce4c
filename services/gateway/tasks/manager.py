"""Background tasks (DESIGN.md section 7): child sessions with their own runs,
per-key concurrency, batched parent notifications, cascade cancel, timeouts.

A task is a row of ``gateway.tasks`` plus a child session (key
``task:<task id>``, linked to the parent) whose runs go through the ordinary
runs queue (:class:`~runyard.gateway.runs.RunStore`) with ``task_id`` set.
Everything that decides what happens to a task is a transaction on
PostgreSQL, so any gateway replica may do it and a restart loses nothing.

The package: :mod:`~runyard.gateway.tasks.model` (vocabulary and pure
rules), :mod:`~runyard.gateway.tasks.store` (the SQL),
:mod:`~runyard.gateway.tasks.sessions` (calls to the sessions service), this
module (the state transitions, :class:`Transitions`, and the API,
:class:`TaskManager`), :mod:`~runyard.gateway.tasks.notifications`,
:mod:`~runyard.gateway.tasks.sweeper` (the loop) and
:mod:`~runyard.gateway.tasks.servicer` (``TaskService`` for workers' tools).

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
loop looks for RUNNING tasks whose run is terminal) the task completes,
or is retried (a retryable failure, up to ``tasks.max_attempts``; the retry
excludes the models that failed and are still cooling down according to the
router, and ``attempt`` only goes up), or ends ERROR / INTERRUPTED. A task
whose run completed while it has subtasks keeps RUNNING without a slot;
once they ended it takes a slot again and continues with a follow-up run
that carries their notification.

**Notifications.** See :mod:`runyard.gateway.tasks.notifications`.

**Cascade.** Deleting or resetting a session (through the gateway, or any
``session.end`` DELETED/RESET the gateway relays) cancels every pending or
running task below it, at any depth, frees their slots and cancels their
runs. A task that ends other than COMPLETED takes its subtasks with it.

**Timeouts.** A task PENDING for ``tasks.queue_ttl_s`` or RUNNING with no
run event (nor other progress) for ``tasks.stale_after_s`` ends ERROR
(``TASK_QUEUE_TTL_EXPIRED`` / ``TASK_STALE``) and notifies its parent.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol

import asyncpg

from runyard._proto.v1 import common_pb2, router_pb2, router_pb2_grpc, sessions_pb2_grpc
from runyard.common import db, metrics
from runyard.common.auth import internal_metadata
from runyard.common.clients import call
from runyard.common.config import Config
from runyard.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RunyardError,
)
from runyard.common.pagination import decode_time_cursor, page_size, time_cursor_page
from runyard.gateway.run_status import TERMINAL as RUN_TERMINAL
from runyard.gateway.run_status import RunStatus
from runyard.gateway.runs import Claim, RunStore
from runyard.gateway.tasks.model import (
    ACTIVE,
    BATCH,
    MAX_EVENTS_SCANNED,
    TASK_KEY_PREFIX,
    TERMINAL,
    Activity,
    Duplicate,
    Effects,
    SpawnRequest,
    TaskStatus,
    chain_of,
    concurrency_key,
    error_of,
    failover_notices,
    lifecycle_event,
    request_fingerprint,
    retry_exclusions,
    slot_limit,
    task_proto,
    task_run_payload,
    validate_spawn,
)
from runyard.gateway.tasks.notifications import Notifier, confirm_deliveries, messages_of
from runyard.gateway.tasks.sessions import TaskSessions
from runyard.gateway.tasks.store import TaskStore
from runyard.gateway.tasks.sweeper import Sweeper
from runyard.gateway.watch import OUTBOX

__all__ = ["TaskManager", "Transitions"]

log = logging.getLogger(__name__)


class RunCanceller(Protocol):
    """What the tasks need of the dispatcher (:class:`runyard.gateway.hub.Dispatcher`)."""

    def wake(self) -> None:
        """Look for queued runs now."""

    def cancel_local(self, run_id: uuid.UUID, reason: str = "") -> bool:
        """Stop a run executing on a worker of this gateway."""


# ---------------------------------------------------------------- state transitions


class Transitions:
    """What happens to tasks: slots granted, runs started, tasks ended (with
    their subtasks), ended runs applied, cascades; each inside the caller's
    transaction, with what must follow the commit collected in an
    :class:`~runyard.gateway.tasks.model.Effects` for :meth:`after`.

    Args:
        config: the configuration (``[tasks]``, agents).
        store: the tasks' SQL.
        runs: the runs queue.
        dispatcher: woken when runs are queued; cancels runs on this gateway.
        activity: the loop's wake-up and idle flag.
        gateway_id: this gateway (lifecycle events' ``source``).
        cooling_models: the router's view of which models cool down (see
            :func:`cooling_models`); None = every model that failed does.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        runs: RunStore,
        dispatcher: RunCanceller,
        activity: Activity,
        *,
        gateway_id: str,
        cooling_models: Callable[[], Awaitable[set[str] | None]] | None = None,
    ):
        self.config = config
        self.cfg = config.tasks
        self.store = store
        self.runs = runs
        self.dispatcher = dispatcher
        self.activity = activity
        self.gateway_id = gateway_id
        self.cooling_models = cooling_models
        self._gauge_keys: set[str] = set()

    async def emit(self, conn: db.Connection, rows: Iterable[Any], kind: str, effects: Effects) -> None:
        """Write the lifecycle event ``kind`` of each row to the outbox (same transaction)."""
        events = [lifecycle_event(row, kind, self.gateway_id) for row in rows]
        if events:
            await OUTBOX.emit(conn, events)
            effects.events = True

    # ------------------------------------------------------------ slots and runs

    async def grant_freed(self, conn: db.Connection, effects: Effects) -> None:
        """Grant the keys ``effects`` freed slots of (last step of a transaction)."""
        while effects.grant_keys:
            key = min(effects.grant_keys)
            effects.grant_keys.discard(key)
            effects.merge(await self.grant(conn, key))

    async def grant(self, conn: db.Connection, key: str) -> Effects:
        """Hand free slots of ``key`` to its oldest waiters (in ``conn``'s transaction)."""
        effects = Effects()
        await self.store.xact_lock(conn, f"runyard.tasks.slots:{key}")
        limit = slot_limit(self.config, key)
        free = BATCH
        if limit:
            free = min(limit - await self.store.slots_held(conn, key), BATCH)
            if free <= 0:
                return effects
        for row in await self.store.lock_waiters(conn, key, free):
            effects.merge(await self.start_run(conn, row))
        return effects

    async def grant_all(self) -> None:
        """Hand free slots to waiters of every key (safety net; grants
        normally happen where a slot is freed)."""
        for key in await self.store.waiting_keys():
            async with self.store.pool.acquire() as conn, conn.transaction():
                effects = await self.grant(conn, key)
            await self.after(effects)

    async def start_run(self, conn: db.Connection, row: Any, *, retry: bool = False) -> Effects:
        """Queue the next run of task ``row`` and give it a slot.

        The first run answers the prompt; a retry repeats the input of the run
        that failed; a follow-up run (after subtasks ended) carries their
        notifications. A task whose run cannot be queued ends ERROR.
        """
        effects = Effects(changed=True)
        await confirm_deliveries(conn, self.store, self.runs, row["session_key"])
        notes = await self.store.lock_pending_news(conn, row["org_id"], row["session_key"])
        text = row["prompt"] if row["runs_completed"] == 0 else ""
        if not text and not notes:
            # A follow-up with nothing to deliver: the task is done (it held
            # no slot, so there is nothing to hand over).
            done = await self.end(conn, [row], TaskStatus.COMPLETED, notify=True)
            done.grant_keys.clear()
            effects.merge(done)
            return effects
        attempt = row["attempt"] + 1
        payload = task_run_payload(
            row, run_id=uuid.uuid4(), attempt=attempt, text=text, messages=messages_of(notes)
        )
        try:
            inserted, _ = await self.runs.insert(
                payload,
                fingerprint=request_fingerprint([payload.idempotency_key]),
                strategy="ENQUEUE",
                conn=conn,
            )
        except RunyardError as exc:
            # The task's session refuses another run (its queue is full of
            # runs sent to it directly). The insert rolled back to its
            # savepoint; end the task rather than fail the caller's
            # transaction, which would block the key's queue for good.
            effects.merge(
                await self.end(conn, [row], TaskStatus.ERROR, error=exc.to_run_error(), notify=True)
            )
            return effects
        run_id = inserted["id"]  # the run queued first if this attempt's run already exists
        effects.runs_queued = True
        await self.store.attach_news(conn, notes, run_id)
        updated = await self.store.mark_running(conn, row["id"], run_id, attempt)
        if row["status"] == TaskStatus.PENDING or retry:
            await self.emit(conn, [updated], "task.started", effects)
        return effects

    # ------------------------------------------------------------ ending tasks

    async def end(
        self,
        conn: db.Connection,
        rows: Sequence[Any],
        status: TaskStatus,
        *,
        error: common_pb2.RunError | None = None,
        result: str | None = None,
        notify: bool,
    ) -> Effects:
        """End active tasks ``rows`` (locked by the caller) with ``status``:
        free their slots (handed to the next waiters), write task.completed,
        queue the parent notification (``notify``), cancel their active runs
        after commit and, unless COMPLETED, cancel the subtasks below them."""
        effects = Effects()
        ids = [r["id"] for r in rows if r["status"] in ACTIVE]
        if not ids:
            return effects
        effects.changed = True
        ended = await self.store.end(
            conn,
            ids,
            status,
            error=error.SerializeToString() if error is not None else None,
            result=result if result is not None else (error.message if error is not None else None),
            notify=notify,
        )
        if not ended:
            return effects
        await self.emit(conn, ended, "task.completed", effects)
        why = error.message if error is not None else status
        effects.cancel_runs += [
            (r["org_id"], r["id"], why) for r in await self.runs.active_runs_of_tasks(conn, ids)
        ]
        await self.store.drop_news_for_task_sessions(conn, [r["session_id"] for r in ended])
        if status != TaskStatus.COMPLETED:
            await self._end_subtasks(conn, ended, ids, status, effects)
        # Freed slots go to the next waiters before the transaction commits
        # (the caller's grant_freed), once every task it ends has ended.
        effects.grant_keys |= {r["concurrency_key"] for r in ended}
        for row in ended:
            log.info("task %s ended %s", row["id"], status)
        return effects

    async def _end_subtasks(
        self,
        conn: db.Connection,
        ended: Sequence[Any],
        ids: list[uuid.UUID],
        status: TaskStatus,
        effects: Effects,
    ) -> None:
        """Cancel the direct subtasks of tasks that ended ``status`` (each takes its own along)."""
        below = [
            r for r in await self.store.lock_trees_below(conn, ended[0]["org_id"], ids) if r["id"] not in ids
        ]
        parents = {r["id"] for r in ended}
        for row in below:
            # Direct children name their parent; deeper ones are taken
            # along by their own parent's end below.
            if row["parent_task_id"] not in parents:
                continue
            effects.merge(
                await self.end(
                    conn,
                    [row],
                    TaskStatus.CANCELLED,
                    notify=False,
                    error=common_pb2.RunError(
                        code="CANCELLED",
                        reason="PARENT_TASK_ENDED",
                        message=f"cancelled because its parent task {row['parent_task_id']} ended ({status})",
                    ),
                )
            )

    async def cascade(
        self, conn: db.Connection, org_id: str, ids: list[uuid.UUID], reason: str, effects: Effects
    ) -> int:
        """Cancel every active task of or below sessions ``ids`` that were
        deleted or reset (``reason`` DELETED or RESET) and drop their news;
        returns how many tasks were locked."""
        rows = await self.store.lock_trees_of_sessions(conn, org_id, ids)
        what = "deleted" if reason == "DELETED" else "reset"
        # A task whose own session was deleted still has a parent to tell.
        own = [r for r in rows if r["session_id"] in ids and r["parent_session_id"] not in ids]
        own_ids = {r["id"] for r in own}
        rest = [r for r in rows if r["id"] not in own_ids]
        effects.merge(
            await self.end(
                conn,
                own,
                TaskStatus.CANCELLED,
                notify=True,
                error=common_pb2.RunError(
                    code="CANCELLED",
                    reason=f"TASK_SESSION_{reason}",
                    message=f"the task's session was {what}",
                ),
            )
        )
        effects.merge(
            await self.end(
                conn,
                rest,
                TaskStatus.CANCELLED,
                notify=False,
                error=common_pb2.RunError(
                    code="CANCELLED",
                    reason=f"PARENT_SESSION_{reason}",
                    message=f"cancelled because its parent session was {what}",
                ),
            )
        )
        # News for the ended sessions is read by no one: neither what is
        # batched nor what is not yet (notifications follow the session key,
        # so it would otherwise reach the key's next conversation).
        await self.store.skip_news_of_sessions(conn, org_id, ids)
        return len(rows)

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
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            count = await self.cascade(conn, org_id, ids, reason, effects)
            await self.grant_freed(conn, effects)
        await self.after(effects)
        if count:
            log.info(
                "cancelled %d task(s) below session(s) %s (%s)",
                count,
                ", ".join(map(str, ids)),
                reason.lower(),
            )
        return count

    async def after(self, effects: Effects) -> None:
        """Post-commit: cancel runs, wake the dispatcher and the loop."""
        for org_id, run_id, reason in effects.cancel_runs:
            try:
                row = await self.runs.cancel(org_id, run_id, f"task ended: {reason}"[:500])
            except NotFound:
                continue
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("cancelling run %s of an ended task failed (%s); the sweep retries", run_id, exc)
                continue
            if row["status"] == RunStatus.RUNNING:
                self.dispatcher.cancel_local(run_id)
        if effects.runs_queued:
            self.dispatcher.wake()
        if effects.changed:
            self.activity.changed()
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self.update_gauges()  # the sweep sets it again anyway

    async def update_gauges(self) -> None:
        """``runyard_task_slots_in_use{key}`` from the shared table."""
        seen = await self.store.slots_by_key()
        for key in self._gauge_keys | set(seen):
            metrics.TASK_SLOTS_IN_USE.labels(key).set(seen.get(key, 0))
        self._gauge_keys |= set(seen)

    # ------------------------------------------------------------ runs that ended

    async def reconcile(self, guard: Callable[[str, Awaitable[bool]], Awaitable[bool | None]]) -> int:
        """Apply the outcome of every ended run of a RUNNING task; returns how many.

        ``guard(what, work)`` runs one task's step so that one task that
        cannot be moved on does not hold up the others (the loop's
        :meth:`~runyard.gateway.tasks.sweeper.Sweeper.guarded`).
        """
        holders = await self.store.slot_holders()
        ended = await self.runs.ended_statuses([h["run_id"] for h in holders])
        candidates = [(h["id"], ended[h["run_id"]]) for h in holders if h["run_id"] in ended][:BATCH]
        if not candidates:
            return 0
        cooling: set[str] | None = None
        if any(status == RunStatus.FAILED for _, status in candidates) and self.cooling_models is not None:
            cooling = await self.cooling_models()
        done = 0
        for task_id, _ in candidates:
            done += bool(await guard(f"task {task_id}", self._reconcile_one(task_id, cooling)))
        return done

    async def _reconcile_one(self, task_id: uuid.UUID, cooling: set[str] | None) -> bool:
        async with self.store.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock_slot_holder(conn, task_id)
            if row is None:
                return False
            run = await self.runs.outcome(conn, row["run_id"])
            if run is None or run["status"] not in RUN_TERMINAL:
                return False
            effects = await self.run_ended(conn, row, run, cooling)
            await self.grant_freed(conn, effects)
        await self.after(effects)
        return True

    async def run_ended(self, conn: db.Connection, row: Any, run: Any, cooling: set[str] | None) -> Effects:
        """Apply the outcome of task ``row``'s ended ``run`` (both locked):
        complete, continue later, retry or end."""
        failovers, notices = failover_notices(
            await self.runs.first_events(conn, run["id"], MAX_EVENTS_SCANNED)
        )
        if run["status"] == RunStatus.COMPLETED:
            await self.store.record_notices(conn, row["id"], row["attempt"], notices)
            return await self._run_completed(conn, row, run)
        if run["status"] == RunStatus.CANCELLED:
            await self.store.record_notices(conn, row["id"], row["attempt"], notices)
            why = run["cancel_reason"] or "cancelled"
            error = common_pb2.RunError(
                code="CANCELLED",
                reason="RUN_INTERRUPTED",
                message=f"the task's run was cancelled ({why.lower()})",
            )
            return await self.end(conn, [row], TaskStatus.INTERRUPTED, error=error, notify=True)
        error = error_of(run)
        notices.append(f"attempt {row['attempt']} failed: {error.reason}: {error.message}")
        await self.store.record_notices(conn, row["id"], row["attempt"], notices)
        return await self._run_failed(conn, row, error, failovers, cooling)

    async def _run_completed(self, conn: db.Connection, row: Any, run: Any) -> Effects:
        # The terminal event is the run's last (the failover scan may stop short of it).
        last = await self.runs.last_event(conn, run["id"], run["last_seq"])
        result = last.completed.message.content[: self.cfg.result_max_chars]
        if await self.store.has_open_subtasks_or_news(conn, row):
            # Subtasks are still going (or their news is undelivered):
            # keep RUNNING, give the slot back, continue once they ended.
            await self.store.return_slot_keep_running(conn, row["id"], result)
            return Effects(changed=True, grant_keys={row["concurrency_key"]})
        await self.store.count_run_completed(conn, row["id"])
        return await self.end(conn, [row], TaskStatus.COMPLETED, result=result, notify=True)

    async def _run_failed(
        self,
        conn: db.Connection,
        row: Any,
        error: common_pb2.RunError,
        failovers: Sequence[common_pb2.ModelFailover],
        cooling: set[str] | None,
    ) -> Effects:
        attempt = row["attempt"]
        if error.reason == "ATTEMPTS_EXHAUSTED":
            # The run's worker was lost on every execution: interrupted, not failed.
            return await self.end(conn, [row], TaskStatus.INTERRUPTED, error=error, notify=True)
        # Attempts of this step: the runs since the task's last completed one.
        if not error.retryable or attempt - row["runs_completed"] >= self.cfg.max_attempts:
            return await self.end(conn, [row], TaskStatus.ERROR, error=error, notify=True)
        # Never go back to a model that failed and is still cooling down
        # (when the router cannot be asked, to none that failed).
        exclude = retry_exclusions(row, error, failovers, cooling)
        chain = chain_of(self.config, row)
        if not [ref for ref in chain if ref not in exclude]:
            error.message = (
                f"attempt {attempt} failed ({error.reason}: {error.message}) and every model of the task's "
                f"chain ({', '.join(chain)}) failed and is still cooling down; not retrying"
            )
            return await self.end(conn, [row], TaskStatus.ERROR, error=error, notify=True)
        row = await self.store.set_exclude_models(conn, row["id"], exclude)
        log.info(
            "task %s: attempt %d failed (%s); retrying without %s",
            row["id"],
            attempt,
            error.reason,
            ", ".join(exclude) or "no model excluded",
        )
        return await self.start_run(conn, row, retry=True)


def cooling_models(
    router: router_pb2_grpc.RouterServiceStub, metadata: Sequence[tuple[str, str]]
) -> Callable[[], Awaitable[set[str] | None]]:
    """A function asking the router which models ("provider/model") have
    every auth profile cooling down or disabled now (None if it cannot be asked)."""

    async def ask() -> set[str] | None:
        try:
            response = await call(
                router.GetProviderStatus(
                    router_pb2.GetProviderStatusRequest(), metadata=metadata, timeout=3.0
                )
            )
        except RunyardError as exc:
            log.warning(
                "router status unavailable (%s); retries exclude every model that failed", exc.message
            )
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

    return ask


# ---------------------------------------------------------------- the API


class TaskManager:
    """Background tasks of one gateway: the API behind
    SpawnTask/ListTasks/GetTask/CancelTask and the ``TaskService``, the
    dispatcher hook that delivers notifications (:meth:`prepare`), and the
    loop that moves tasks along (:meth:`start`, :meth:`close`).

    Builds its parts (store, transitions, notifier, sweeper) and hands each
    the collaborators it needs.

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
        dispatcher: RunCanceller,
        sessions: sessions_pb2_grpc.SessionServiceStub,
        *,
        gateway_id: str,
        router: router_pb2_grpc.RouterServiceStub | None = None,
    ):
        self.config = config
        self.cfg = config.tasks
        self.runs = runs
        self.store = TaskStore(pool)
        self.activity = Activity()
        metadata = internal_metadata(config.auth.internal_secret)
        self.sessions = TaskSessions(sessions, metadata)
        self.transitions = Transitions(
            config,
            self.store,
            runs,
            dispatcher,
            self.activity,
            gateway_id=gateway_id,
            cooling_models=cooling_models(router, metadata) if router is not None else None,
        )
        self.notifier = Notifier(config, self.store, runs, self.transitions, self.sessions, self.activity)
        self.sweeper = Sweeper(
            config, self.store, runs, self.transitions, self.notifier, self.sessions, self.activity
        )

    # ------------------------------------------------------------ spawn

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
        description, model = validate_spawn(self.config, request)
        fingerprint = fingerprint or request.fingerprint()
        key = request.idempotency_key or None
        if key is not None:
            existing = await self._existing(self.store.pool, org_id, key, fingerprint)
            if existing is not None:
                return await self.get(org_id, existing["id"])
        parent = await self.sessions.get(
            org_id, request.parent_session_id, request.parent_session_key, timeout
        )
        if parent.HasField("end_time"):
            raise FailedPrecondition(
                f"parent session {parent.id} has ended; spawn tasks under the key's current session",
                reason="PARENT_SESSION_ENDED",
                field="parent_session_id",
            )
        parent_id = uuid.UUID(parent.id)
        parent_task = await self.store.task_of_session(org_id, parent_id)
        depth = self._depth(parent_task)
        await self._check_active(self.store.pool, parent_id)
        agent_id = request.agent_id or parent.agent_id or self.config.gateway.default_agent
        agent = self.config.agent(agent_id)
        if agent is None:
            raise NotFound(
                f"agent {agent_id!r} is not configured", reason="AGENT_NOT_FOUND", field="agent_id"
            )
        ckey = concurrency_key(self.config, model or agent.model)
        task_id = uuid.uuid4()
        session_key = f"{TASK_KEY_PREFIX}{task_id}"
        child = await self.sessions.create_child(org_id, session_key, agent_id, parent.id, timeout)
        values = (
            task_id,
            org_id,
            parent_id,
            parent.key,
            parent.agent_id,
            parent_task["id"] if parent_task is not None else None,
            depth,
            uuid.UUID(child.id),
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
        try:
            effects = await self._insert(org_id, parent_id, parent_task, key, fingerprint, values)
        except (Duplicate, RunyardError, asyncpg.PostgresError) as exc:
            await self.sessions.discard(org_id, child.id)
            existing_id = await self._repeat_of(exc, org_id, key, fingerprint)
            if existing_id is None:
                raise
            return await self.get(org_id, existing_id)
        self.activity.idle = False  # this replica has work again, whatever the last sweep saw
        await self.transitions.after(effects)
        log.info("task %s spawned under session %s (key %s)", task_id, parent_id, ckey)
        return await self.get(org_id, task_id)

    def _depth(self, parent_task: Any) -> int:
        """The depth of a task under ``parent_task`` (None: a top-level task).

        Raises:
            FailedPrecondition: the parent task has ended (PARENT_TASK_ENDED).
            ResourceExhausted: deeper than ``tasks.max_depth`` (TASK_DEPTH_EXCEEDED).
        """
        depth = 1
        if parent_task is not None:
            if parent_task["status"] in TERMINAL:
                raise _parent_task_ended(parent_task["id"], parent_task["status"])
            depth = parent_task["depth"] + 1
        if depth > self.cfg.max_depth:
            raise ResourceExhausted(
                f"a task at depth {depth} is deeper than tasks.max_depth ({self.cfg.max_depth})",
                reason="TASK_DEPTH_EXCEEDED",
            )
        return depth

    async def _insert(
        self,
        org_id: str,
        parent_id: uuid.UUID,
        parent_task: Any,
        key: str | None,
        fingerprint: bytes,
        values: tuple[Any, ...],
    ) -> Effects:
        """Insert the task (and start it when a slot is free) in one transaction.

        Raises:
            Duplicate: an idempotent repeat committed first.
        """
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            # One spawn at a time per parent: the active count and the
            # idempotency check below hold.
            await self.store.xact_lock(conn, f"runyard.tasks.parent:{parent_id}")
            if key is not None:
                existing = await self._existing(conn, org_id, key, fingerprint)
                if existing is not None:
                    raise Duplicate(existing["id"])
            if parent_task is not None:
                # The parent task must not end while its subtask is being
                # added (its run's end checks for subtasks under this lock).
                status = await self.store.status_for_share(conn, parent_task["id"])
                if status in TERMINAL:
                    raise _parent_task_ended(parent_task["id"], status)
            await self._check_active(conn, parent_id)
            row = await self.store.insert(conn, *values)
            await self.transitions.emit(conn, [row], "task.spawned", effects)
            effects.grant_keys.add(row["concurrency_key"])
            await self.transitions.grant_freed(conn, effects)
        return effects

    async def _repeat_of(
        self, exc: BaseException, org_id: str, key: str | None, fingerprint: bytes
    ) -> uuid.UUID | None:
        """The task a failed insert repeats (an idempotent repeat), if it was one."""
        if isinstance(exc, Duplicate):
            return exc.task_id
        if isinstance(exc, asyncpg.UniqueViolationError) and key is not None:
            existing = await self._existing(self.store.pool, org_id, key, fingerprint)
            if existing is not None:
                task_id: uuid.UUID = existing["id"]
                return task_id
        return None

    async def _existing(self, conn: db.Executor, org_id: str, key: str, fingerprint: bytes) -> Any:
        row = await self.store.by_idempotency_key(conn, org_id, key)
        if row is not None and row["request_hash"] is not None and bytes(row["request_hash"]) != fingerprint:
            raise InvalidArgument(
                f"idempotency_key was already used for task {row['id']} with a different request",
                reason="IDEMPOTENCY_KEY_REUSED",
                field="idempotency_key",
                metadata={"task_id": str(row["id"])},
            )
        return row

    async def _check_active(self, conn: db.Executor, parent_id: uuid.UUID) -> None:
        active = await self.store.active_children(conn, parent_id)
        if active >= self.cfg.max_active_per_parent:
            raise ResourceExhausted(
                f"session {parent_id} already has {active} pending or running tasks "
                f"(tasks.max_active_per_parent = {self.cfg.max_active_per_parent})",
                reason="TOO_MANY_TASKS",
                retry_after_s=1.0,
            )

    # ------------------------------------------------------------ reads

    async def get(
        self, org_id: str, task_id: uuid.UUID, *, parent_session_key: str | None = None
    ) -> common_pb2.Task:
        """One task with its notices.

        ``parent_session_key`` limits the lookup to tasks spawned under that
        session key (the ``TaskService`` scope).

        Raises:
            NotFound: no such task in this org (TASK_NOT_FOUND, field task_id).
        """
        row = await self.store.get(org_id, task_id, parent_session_key)
        if row is None:
            raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
        notices = await self.store.notices(self.store.pool, [row["id"]])
        return task_proto(row, notices.get(row["id"], ()))

    async def list(
        self, org_id: str, parent_session_id: uuid.UUID, size: int, token: str
    ) -> tuple[list[common_pb2.Task], str]:
        """One page of the tasks spawned under a session, oldest first."""
        limit = page_size(size)
        rows = await self.store.page(org_id, parent_session_id, decode_time_cursor("tasks", token), limit + 1)
        page, next_token = time_cursor_page("tasks", rows, limit)
        notices = await self.store.notices(self.store.pool, [r["id"] for r in page])
        return [task_proto(r, notices.get(r["id"], ())) for r in page], next_token

    # ------------------------------------------------------------ cancel

    async def cancel(self, org_id: str, task_id: uuid.UUID, reason: str = "") -> common_pb2.Task:
        """Cancel a task and every pending or running subtask below it.

        The task ends CANCELLED at once (its parent is notified), its slot
        goes to the next waiter and its run is cancelled. A task that has
        already ended is returned unchanged.

        Raises:
            NotFound: no such task in this org.
        """
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            if not await self.store.exists(conn, org_id, task_id):
                raise NotFound(f"task {task_id} not found", reason="TASK_NOT_FOUND", field="task_id")
            # Lock the whole subtree first (the same order as every cascade);
            # end() takes the subtasks along.
            rows = await self.store.lock_tree_of_task(conn, org_id, task_id)
            root = [r for r in rows if r["id"] == task_id]
            message = f"cancelled by the client{': ' + reason if reason else ''}"
            error = common_pb2.RunError(code="CANCELLED", reason="TASK_CANCELLED", message=message)
            effects.merge(
                await self.transitions.end(conn, root, TaskStatus.CANCELLED, error=error, notify=True)
            )
            await self.transitions.grant_freed(conn, effects)
        await self.transitions.after(effects)
        return await self.get(org_id, task_id)

    async def session_ended(self, org_id: str, session_ids: Sequence[str], reason: str) -> int:
        """See :meth:`Transitions.session_ended`."""
        return await self.transitions.session_ended(org_id, session_ids, reason)

    # ------------------------------------------------------------ the dispatcher hook and the loop

    async def prepare(self, claim: Claim, payload: common_pb2.RunPayload) -> None:
        """See :meth:`Notifier.prepare` (``Dispatcher.prepare``)."""
        await self.notifier.prepare(claim, payload)

    def wake(self, *_: object) -> None:
        """Look at tasks soon (a run was queued or ended somewhere)."""
        self.activity.wake()

    async def start(self) -> None:
        """Start the background loop."""
        await self.sweeper.start()

    async def close(self) -> None:
        """Stop the loop."""
        await self.sweeper.close()

    # ------------------------------------------------------------ single passes (the loop's phases)

    async def reconcile(self) -> int:
        """See :meth:`Transitions.reconcile`."""
        return await self.transitions.reconcile(self.sweeper.guarded)

    async def grant_all(self) -> None:
        """See :meth:`Transitions.grant_all`."""
        await self.transitions.grant_all()

    async def consume_session_ends(self) -> int:
        """See :meth:`Sweeper.consume_session_ends`."""
        return await self.sweeper.consume_session_ends()

    async def batch_notifications(self) -> float | None:
        """See :meth:`Notifier.batch_notifications`."""
        return await self.notifier.batch_notifications()

    async def step(self, *, full: bool = True) -> float | None:
        """See :meth:`Sweeper.step`."""
        return await self.sweeper.step(full=full)

    async def _record_notices(
        self, conn: db.Connection, task_id: uuid.UUID, attempt: int, texts: Iterable[str]
    ) -> int:
        """See :meth:`TaskStore.record_notices` (kept for the tests that call it here)."""
        return await self.store.record_notices(conn, task_id, attempt, texts)


def _parent_task_ended(task_id: uuid.UUID, status: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the parent session belongs to task {task_id}, which has ended ({status})",
        reason="PARENT_TASK_ENDED",
        field="parent_session_id",
    )
