"""The loop that moves background tasks along: on every wake-up (a run was
queued or ended, something here changed) it applies ended runs and confirms
deliveries; every ``tasks.sweep_interval_ms`` it also runs the timeouts and
safety nets (expired and stale tasks, tasks waiting for nothing, runs of
ended tasks, session ends, vanished parents, free slots, gauges); then it
batches and delivers notifications.

A phase that fails is logged and the others still run (a sessions outage or
one bad row must not stop notifications or the queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

import asyncpg

from runyard._proto.v1 import common_pb2
from runyard.common import db
from runyard.common.config import Config
from runyard.common.errors import NotFound, RunyardError
from runyard.gateway.runs import RunStore
from runyard.gateway.tasks.model import ACTIVE, BATCH, Activity, Effects, TaskStatus
from runyard.gateway.tasks.sessions import TaskSessions
from runyard.gateway.tasks.store import TaskStore

if TYPE_CHECKING:
    from runyard.gateway.tasks.manager import Transitions
    from runyard.gateway.tasks.notifications import Notifier

__all__ = ["Sweeper"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Sweeper:
    """The background loop of one gateway's tasks (module docstring).

    Args:
        config: the configuration (``[tasks]``).
        store: the tasks' SQL.
        runs: the runs queue (runs of ended tasks).
        transitions: ends, grants, cascades and after-commit effects.
        notifier: confirms, batches and delivers notifications.
        sessions: the sessions service (do parents still exist?).
        activity: the loop's wake-up and idle flag.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        runs: RunStore,
        transitions: Transitions,
        notifier: Notifier,
        sessions: TaskSessions,
        activity: Activity,
    ):
        self.cfg = config.tasks
        self.store = store
        self.runs = runs
        self.transitions = transitions
        self.notifier = notifier
        self.sessions = sessions
        self.activity = activity
        self._task: asyncio.Task[None] | None = None
        #: Where check_parents() resumes (it walks parent ids in order, a batch per sweep).
        self._parent_cursor = uuid.UUID(int=0)
        #: A phase of the current step failed (see guarded).
        self._failed = False

    async def start(self) -> None:
        """Start the loop."""
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
                    await self.activity.wakeup.wait()
            self.activity.wakeup.clear()
            full = time.monotonic() - last_sweep >= sweep_s
            if full:
                last_sweep = time.monotonic()
            self._failed = False
            next_due = await self.step(full=full)
            if self._failed:
                await asyncio.sleep(min(sweep_s, 1.0))  # e.g. the database is down: do not spin

    async def guarded(self, what: str, work: Awaitable[T]) -> T | None:
        """``await work``; a failure is logged (None) and noted, never raised: the loop must survive."""
        try:
            return await work
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, RunyardError) as exc:
            log.warning("background tasks: %s failed: %s", what, exc)
        except Exception:
            log.exception("background tasks: %s failed", what)
        self._failed = True
        return None

    async def reconcile(self) -> int:
        """Apply ended runs (:meth:`Transitions.reconcile`), one task at a time under :meth:`guarded`."""
        return await self.transitions.reconcile(self.guarded)

    async def step(self, *, full: bool = True) -> float | None:
        """One pass; returns the seconds until the next notification batch is due (or None)."""
        if full:
            was_idle = self.activity.idle
            busy = await self.guarded("busy", self.store.anything_open())
            self.activity.idle = busy is False
            if self.activity.idle:
                # Nothing to move: only follow session ends (compaction renames
                # apply to ended tasks too) and zero the gauges once.
                await self.guarded("consume_session_ends", self.consume_session_ends())
                if not was_idle:
                    await self.guarded("update_gauges", self.transitions.update_gauges())
                return None
        elif self.activity.idle:
            return None
        phases = [self.notifier.confirm_deliveries, self.reconcile]
        if full:
            phases += [
                self.expire,
                self.settle_waiting,
                self.cancel_orphan_runs,
                self.consume_session_ends,
                self.check_parents,
                self.transitions.grant_all,
                self.transitions.update_gauges,
            ]
        for phase in phases:
            await self.guarded(phase.__name__, phase())
        next_due = await self.guarded("batch_notifications", self.notifier.batch_notifications())
        await self.guarded("deliver_notifications", self.notifier.deliver_notifications())
        return next_due

    # ------------------------------------------------------------ timeouts

    async def expire(self) -> int:
        """End tasks PENDING past ``tasks.queue_ttl_s`` or RUNNING with no
        progress for ``tasks.stale_after_s`` (ERROR); returns how many."""
        queue_ttl, stale = self.cfg.queue_ttl_s, self.cfg.stale_after_s

        def queued_too_long(row: asyncpg.Record) -> common_pb2.RunError:
            return common_pb2.RunError(
                code="DEADLINE_EXCEEDED",
                reason="TASK_QUEUE_TTL_EXPIRED",
                message=(
                    f"the task waited {queue_ttl:g} s for a free '{row['concurrency_key']}' slot "
                    f"without starting (tasks.queue_ttl_s); it never ran"
                ),
            )

        def stalled(row: asyncpg.Record) -> common_pb2.RunError:
            return common_pb2.RunError(
                code="DEADLINE_EXCEEDED",
                reason="TASK_STALE",
                message=(
                    f"the task was running but made no progress for {stale:g} s (tasks.stale_after_s)"
                    + ("; its run was cancelled" if row["slot_held"] else "; it was waiting for a slot")
                ),
            )

        total = 0
        for lock, limit, error_for in (
            (self.store.lock_expired_pending, queue_ttl, queued_too_long),
            (self.store.lock_stale_running, stale, stalled),
        ):
            effects = Effects()
            async with self.store.pool.acquire() as conn, conn.transaction():
                rows = await lock(conn, limit)
                for row in rows:
                    error = error_for(row)
                    effects.merge(
                        await self.transitions.end(conn, [row], TaskStatus.ERROR, error=error, notify=True)
                    )
                    log.warning("task %s: %s", row["id"], error.message)
                await self.transitions.grant_freed(conn, effects)
                total += len(rows)
            await self.transitions.after(effects)
        return total

    # ------------------------------------------------------------ safety nets

    async def settle_waiting(self) -> int:
        """Complete RUNNING tasks that wait for nothing any more: no slot,
        no active subtask and no undelivered news (their subtasks' news
        reached the task's conversation with a run other than the task's
        own, e.g. a message sent to its session). Returns how many."""
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            rows = await self.store.lock_waiting_for_nothing(conn)
            if rows:
                effects.merge(await self.transitions.end(conn, rows, TaskStatus.COMPLETED, notify=True))
                await self.transitions.grant_freed(conn, effects)
        await self.transitions.after(effects)
        return len(rows)

    async def cancel_orphan_runs(self) -> int:
        """Cancel active runs of tasks that have ended (a cancel lost to a crash)."""
        runs = await self.runs.active_task_runs()
        statuses = await self.store.statuses(list({r["task_id"] for r in runs}))
        orphans = [
            (r["org_id"], r["id"], f"task {statuses[r['task_id']]}")
            for r in runs
            if r["task_id"] in statuses and statuses[r["task_id"]] not in ACTIVE
        ][:BATCH]
        await self.transitions.after(Effects(cancel_runs=orphans))
        return len(orphans)

    async def check_parents(self) -> int:
        """Safety net for parents deleted without a ``session.end``: maintenance
        prunes an idle session, which has no open activation to end, so no
        event reaches the gateway. Asks sessions about up to ``BATCH``
        parents of active tasks per sweep (rotating through them) and
        cascades for those it no longer knows, or knows as reset or deleted
        (a spawn that committed after the cascade). Returns how many tasks ended."""
        rows = await self.store.parents_of_active(self._parent_cursor)
        self._parent_cursor = rows[-1]["parent_session_id"] if len(rows) == BATCH else uuid.UUID(int=0)
        ended = 0
        for row in rows:
            try:
                session = await self.sessions.get(
                    row["org_id"], str(row["parent_session_id"]), "", timeout=5.0
                )
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
            ended += await self.transitions.session_ended(
                row["org_id"], [str(row["parent_session_id"])], reason
            )
        return ended

    async def consume_session_ends(self) -> int:
        """Cascade for every ``session.end`` DELETED or RESET that reached the
        gateway outbox (sessions deleted or reset by any path, e.g.
        maintenance), and follow compaction rollovers (tasks and their
        notifications move to the conversation's new session id). Returns
        how many events were read."""
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            after = await self.store.lock_session_end_cursor(conn)
            if after is None:
                return 0
            top = await self.store.outbox_top(conn)
            if top is None or top <= after:
                return 0
            rows = await self.store.session_ends(conn, after, top, BATCH * 5)
            for row in rows:
                await self._session_end(
                    conn, common_pb2.LifecycleEvent.FromString(bytes(row["data"])), effects
                )
            await self.transitions.grant_freed(conn, effects)
            await self.store.set_session_end_cursor(conn, rows[-1]["pos"] if len(rows) == BATCH * 5 else top)
        await self.transitions.after(effects)
        return len(rows)

    async def _session_end(
        self, conn: db.Connection, event: common_pb2.LifecycleEvent, effects: Effects
    ) -> None:
        reason = common_pb2.SessionEndReason.Name(event.session_end.reason).removeprefix(
            "SESSION_END_REASON_"
        )
        if not event.session_id:
            return
        if reason in ("DELETED", "RESET"):
            await self.transitions.cascade(conn, event.org_id, [uuid.UUID(event.session_id)], reason, effects)
        elif reason == "COMPACTION" and event.session_end.next_session_id:
            old, new = uuid.UUID(event.session_id), uuid.UUID(event.session_end.next_session_id)
            await self.store.follow_compaction(conn, event.org_id, old, new)
