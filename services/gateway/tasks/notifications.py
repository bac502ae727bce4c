"""Parent notifications of background tasks: batching ended tasks into one
system message per parent, delivering it with (or as) a run of the parent,
and confirming the delivery once that run completed.

An ended task is ``notify_state = 'pending'``. Tasks of one parent that end
within ``tasks.notify_batch_window_ms`` of the first are batched into one
system message (``gateway.task_notifications``); when no sibling is left
pending or running the batch is sent at once and says that all tasks are
complete and how many failed. Such a final message starts a run of the
parent unless the parent has an active run; otherwise, and for the other
messages, the notification rides along with the parent's next claimed run
(:meth:`Notifier.prepare`, the dispatcher's hook): it is appended to that
run's input and stored in its payload in one transaction. It counts as
delivered once that run completed (its snapshot, holding the message, is
committed); if the run fails it goes back to pending. Each notification is
delivered exactly once.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from runyard._proto.v1 import common_pb2
from runyard.common import db
from runyard.common.config import Config
from runyard.common.errors import NotFound, RunyardError
from runyard.common.protoutil import now
from runyard.gateway.run_status import RunStatus
from runyard.gateway.runs import Claim, RunStore
from runyard.gateway.tasks.model import (
    BATCH,
    TASK_KEY_PREFIX,
    TERMINAL,
    Activity,
    Effects,
    TaskStatus,
    error_of,
    excerpt,
    request_fingerprint,
)
from runyard.gateway.tasks.sessions import TaskSessions
from runyard.gateway.tasks.store import TaskStore

if TYPE_CHECKING:
    from runyard.gateway.tasks.manager import Transitions

__all__ = ["Notifier", "confirm_deliveries", "messages_of", "notification_message"]

log = logging.getLogger(__name__)


def _seconds(delta: dt.timedelta) -> str:
    value = max(delta.total_seconds(), 0.0)
    return f"{value:.1f} s" if value < 60 else f"{value / 60:.1f} min"


def _task_line(row: Any, result_chars: int) -> str:
    status = row["status"].upper()
    took = _seconds(row["ended_at"] - row["created_at"])
    line = f'- Task {row["id"]} "{row["description"]}": {status} after {took}.'
    if row["status"] == TaskStatus.COMPLETED:
        return line + f" Result: {excerpt(row['result'], result_chars) or '(empty)'}"
    return line + f" Error: {excerpt(error_of(row).message or row['result'], result_chars)}"


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
    lines += [_task_line(row, result_chars) for row in tasks]
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


def messages_of(notes: Sequence[Any]) -> list[common_pb2.Message]:
    """The messages of ``gateway.task_notifications`` rows."""
    return [common_pb2.Message.FromString(bytes(n["message"])) for n in notes]


async def confirm_deliveries(
    conn: db.Connection, store: TaskStore, runs: RunStore, session_key: str | None
) -> None:
    """Notifications (for ``session_key``, or all) whose run completed are
    delivered; those whose run failed or was cancelled go back to pending."""
    attached = await store.attached_news(conn, session_key)
    if not attached:
        return
    ended = await runs.ended_statuses([n["run_id"] for n in attached], conn)
    await store.settle_attached_news(
        conn,
        [
            (n["id"], n["run_id"], ended[n["run_id"]] == RunStatus.COMPLETED)
            for n in attached
            if n["run_id"] in ended
        ],
    )


class Notifier:
    """Batches, delivers and confirms parent notifications (module docstring).

    Args:
        config: the configuration (``[tasks]``).
        store: the tasks' SQL.
        runs: the runs queue (notification runs, payloads of claimed runs).
        transitions: slots and after-commit effects (a parent task that
            continues with its subtasks' news takes a slot again).
        sessions: the sessions service (is the parent session still there?).
        activity: the loop's wake-up and idle flag.
    """

    def __init__(
        self,
        config: Config,
        store: TaskStore,
        runs: RunStore,
        transitions: Transitions,
        sessions: TaskSessions,
        activity: Activity,
    ):
        self.cfg = config.tasks
        self.store = store
        self.runs = runs
        self.transitions = transitions
        self.sessions = sessions
        self.activity = activity

    # ------------------------------------------------------------ the dispatcher hook

    async def prepare(self, claim: Claim, payload: common_pb2.RunPayload) -> None:
        """Deliver pending notifications with a claimed run of their parent
        (``Dispatcher.prepare``): append them to the run's input and store
        the run's payload with them, in one transaction. Free when idle."""
        if not payload.session_key or self.activity.idle or claim.continuation:
            return  # (a run that continues after client tool results has its input already)
        if not await self.store.has_pending_news(claim.org_id, payload.session_key):
            return
        async with self.store.pool.acquire() as conn, conn.transaction():
            notes = await self.store.lock_pending_news(
                conn, claim.org_id, payload.session_key, skip_locked=True
            )
            if not notes:
                return
            messages = messages_of(notes)
            stored = common_pb2.RunPayload.FromString(claim.payload)
            stored.input.messages.extend(messages)
            if not await self.runs.store_payload(conn, claim.run_id, claim.epoch, stored.SerializeToString()):
                return
            await self.store.attach_news(conn, notes, claim.run_id)
        payload.input.messages.extend(messages)
        log.info("run %s carries %d task notification(s)", claim.run_id, len(messages))

    # ------------------------------------------------------------ batching

    async def batch_notifications(self) -> float | None:
        """Turn ended tasks into parent notifications: a parent's pending
        tasks become one message once the first of them ended
        ``notify_batch_window_ms`` ago, or at once when none of its tasks is
        left pending or running. Returns the seconds until the next batch
        is due (None if nothing waits)."""
        window = self.cfg.notify_batch_window_ms / 1000
        next_due: float | None = None
        for parent in await self.store.parents_with_news():
            age = float(parent["age"])
            if parent["busy"] and age < window:
                wait = window - age
                next_due = wait if next_due is None else min(next_due, wait)
                continue
            await self._batch(parent["parent_session_id"], window)
        return next_due

    async def _batch(self, parent_id: uuid.UUID, window: float) -> None:
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self.store.xact_lock(conn, f"runyard.tasks.notify:{parent_id}")
            tasks = await self.store.lock_news_of_parent(conn, parent_id)
            if not tasks:
                return
            busy = await self.store.parent_has_active_tasks(conn, parent_id)
            age = await self.store.age_s(conn, min(t["ended_at"] for t in tasks))
            if busy and age < window:
                return
            notification_id = uuid.uuid4()
            ids = [t["id"] for t in tasks]
            totals: tuple[int, int, int] | None = None
            if not busy:
                statuses = await self.store.close_round(conn, parent_id, ids)
                totals = (
                    len(statuses),
                    sum(1 for s in statuses if s in (TaskStatus.ERROR, TaskStatus.INTERRUPTED)),
                    sum(1 for s in statuses if s == TaskStatus.CANCELLED),
                )
            message = notification_message(
                tasks,
                notification_id=notification_id,
                result_chars=self.cfg.notify_result_chars,
                totals=totals,
            )
            await self.store.insert_notification(
                conn,
                notification_id,
                tasks[0]["org_id"],
                parent_id,
                tasks[-1]["parent_session_key"],
                message.SerializeToString(),
                totals is not None,
            )
            await self.store.mark_batched(conn, ids, notification_id)
        log.info(
            "notification %s for session %s: %d task(s)%s",
            notification_id,
            parent_id,
            len(ids),
            ", all complete" if totals is not None else "",
        )
        await self.transitions.after(Effects(changed=True))

    # ------------------------------------------------------------ delivery

    async def confirm_deliveries(self) -> None:
        """Notifications whose run completed are delivered; those whose run
        failed or was cancelled go back to pending."""
        async with self.store.pool.acquire() as conn, conn.transaction():
            await confirm_deliveries(conn, self.store, self.runs, None)

    async def deliver_notifications(self) -> None:
        """Start the runs that deliver pending notifications: a follow-up of
        a parent task waiting for its subtasks, or a run of an ordinary
        parent session for an "all complete" message when the parent has no
        active run (otherwise its next run carries them)."""
        parents = await self.store.deliverable(BATCH, f"{TASK_KEY_PREFIX}%", self.cfg.max_notification_runs)
        for parent in parents:
            try:
                await self._deliver(parent)
            except RunyardError as exc:
                log.warning(
                    "delivering task notifications to %s failed: %s",
                    parent["parent_session_key"],
                    exc.message,
                )

    async def _deliver(self, parent: Any) -> None:
        org_id, key, parent_id = parent["org_id"], parent["parent_session_key"], parent["parent_session_id"]
        task = await self.store.task_by_session(parent_id)
        if task is not None:
            await self._continue_parent_task(org_id, key, task)
            return
        if not parent["final"] or parent["failures"] >= self.cfg.max_notification_runs:
            return  # delivered with the parent's next run
        if await self.runs.session_busy(parent_id):
            return  # the parent's next claimed run carries them
        session = await self._current_session(org_id, key, parent_id)
        if session is not None:
            await self._start_notification_run(org_id, key, parent_id, session)

    async def _continue_parent_task(self, org_id: str, key: str, task: Any) -> None:
        """A parent task whose subtasks' news waits takes a slot again (its
        follow-up run carries the news)."""
        if task["status"] in TERMINAL:
            await self._drop(org_id, "its task has ended", key=key)
            return
        effects = Effects()
        async with self.store.pool.acquire() as conn, conn.transaction():
            row = await self.store.lock_idle_parent_task(conn, task["id"])
            if row is None:
                return  # its run is active (it continues when that run ends) or subtasks are left
            await self.store.want_slot(conn, row["id"])
            effects.changed = True
            effects.grant_keys.add(row["concurrency_key"])
            await self.transitions.grant_freed(conn, effects)
        await self.transitions.after(effects)

    async def _current_session(
        self, org_id: str, key: str, parent_id: uuid.UUID
    ) -> common_pb2.Session | None:
        """The parent session to deliver to: the one the news is for, or the
        key's next one after a compaction; None (news dropped) when it is gone."""
        try:
            session = await self.sessions.get(org_id, str(parent_id), "", 10.0)
        except NotFound:
            await self._drop(org_id, "the parent session no longer exists", parent_id=parent_id)
            return None
        if not session.HasField("end_time"):
            return session
        if session.end_reason != common_pb2.SESSION_END_REASON_COMPACTION:
            await self._drop(org_id, "the parent session has ended", parent_id=parent_id)
            return None
        return await self.sessions.get(org_id, "", key, 10.0)

    async def _start_notification_run(
        self, org_id: str, key: str, parent_id: uuid.UUID, session: common_pb2.Session
    ) -> None:
        session_id = uuid.UUID(session.id)
        async with self.store.pool.acquire() as conn, conn.transaction():
            await self.store.xact_lock(conn, f"runyard.tasks.notify:{parent_id}")
            if await self.runs.session_busy(session_id, conn):
                return  # the parent's next claimed run carries them
            notes = await self.store.lock_pending_news(conn, org_id, key)
            if not notes:
                return
            last = await self.runs.last_payload(conn, session_id)
            options = common_pb2.RunOptions()
            if last is not None:
                options.CopyFrom(last.options)
                options.ClearField("client_tools")  # no client follows this run to answer them
            payload = common_pb2.RunPayload(
                run_id=str(uuid.uuid4()),
                org_id=org_id,
                session_id=str(session_id),
                session_key=key,
                agent_id=session.agent_id,
                input=common_pb2.RunInput(messages=messages_of(notes)),
                options=options,
                create_time=now(),
                idempotency_key=f"runyard.task-notification:{notes[0]['id']}:{notes[0]['failed_deliveries']}",
                metadata={"runyard.trigger": "task_notification"},
            )
            inserted, _ = await self.runs.insert(
                payload,
                fingerprint=request_fingerprint([payload.idempotency_key]),
                strategy="ENQUEUE",
                conn=conn,
            )
            run_id = inserted["id"]
            await self.store.attach_news(conn, notes, run_id)
        log.info(
            "started run %s of session %s to deliver %d task notification(s)", run_id, session_id, len(notes)
        )
        await self.transitions.after(Effects(runs_queued=True))

    async def _drop(
        self, org_id: str, why: str, *, key: str = "", parent_id: uuid.UUID | None = None
    ) -> None:
        """Drop the pending notifications for task session ``key``, or for
        session ``parent_id`` only (not its key's: they may be for the key's
        next conversation)."""
        count = await self.store.drop_news(org_id, key=key, parent_id=parent_id)
        log.info("dropped %s task notification(s) for %s: %s", count, key or parent_id, why)
