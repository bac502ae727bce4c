"""SQL of background tasks: ``gateway.tasks``, ``gateway.task_notices``,
``gateway.task_notifications`` and ``gateway.task_cursors`` (migration
0004_tasks.sql). Runs are read and written through
:class:`~runyard.gateway.runs.RunStore`, never here.

Every statement is a named constant; :class:`TaskStore` runs them. Methods
that take ``conn`` run inside the caller's transaction (and those that lock
say so); the others use the pool.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from runyard.common import db
from runyard.common.outbox import HORIZON_SQL
from runyard.gateway.tasks.model import BATCH, TaskStatus, normalise_notice

__all__ = ["COLUMNS", "TaskStore"]

#: Every column of ``gateway.tasks`` (what a "row" means in this package).
COLUMNS = (
    "id, org_id, parent_session_id, parent_session_key, parent_agent_id, parent_task_id, depth, session_id, "
    "session_key, agent_id, description, prompt, model, max_tool_calls, concurrency_key, status, queue_pos, "
    "slot_held, wants_slot, run_id, attempt, runs_completed, exclude_models, result, error, idempotency_key, "
    "request_hash, created_at, started_at, ended_at, progress_at, notify_state, notification_id, "
    "reported_complete"
)

# ---------------------------------------------------------------- tasks: reads

XACT_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

SELECT_BY_IDEMPOTENCY_KEY = f"SELECT {COLUMNS} FROM gateway.tasks WHERE org_id = $1 AND idempotency_key = $2"

SELECT_TASK_OF_SESSION = "SELECT id, status, depth FROM gateway.tasks WHERE session_id = $1 AND org_id = $2"

SELECT_STATUS_FOR_SHARE = "SELECT status FROM gateway.tasks WHERE id = $1 FOR SHARE"

COUNT_ACTIVE_CHILDREN = (
    "SELECT count(*) FROM gateway.tasks WHERE parent_session_id = $1 AND status IN ('pending', 'running')"
)

SELECT_TASK = (
    f"SELECT {COLUMNS} FROM gateway.tasks WHERE id = $1 AND org_id = $2 "
    "AND ($3::text IS NULL OR parent_session_key = $3)"
)

SELECT_PAGE = f"""
    SELECT {COLUMNS} FROM gateway.tasks
    WHERE org_id = $1 AND parent_session_id = $2
      AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4))
    ORDER BY created_at, id LIMIT $5
"""

TASK_EXISTS = "SELECT 1 FROM gateway.tasks WHERE id = $1 AND org_id = $2"

#: Lock and return the active tasks matching ``{roots}`` (SQL over $2) and
#: every active task below them, oldest first.
_LOCK_TREE = f"""
    WITH RECURSIVE tree(id) AS (
        SELECT id FROM gateway.tasks WHERE org_id = $1 AND {{roots}}
        UNION
        SELECT t.id FROM gateway.tasks t JOIN tree ON t.parent_task_id = tree.id
    )
    SELECT {COLUMNS} FROM gateway.tasks
    WHERE id IN (SELECT id FROM tree) AND status IN ('pending', 'running')
    ORDER BY queue_pos FOR UPDATE
"""
LOCK_TREE_OF_TASK = _LOCK_TREE.format(roots="id = $2")
LOCK_TREES_OF_SESSIONS = _LOCK_TREE.format(
    roots="(parent_session_id = ANY($2::uuid[]) OR session_id = ANY($2::uuid[]))"
)
LOCK_TREES_BELOW_TASKS = _LOCK_TREE.format(roots="parent_task_id = ANY($2::uuid[])")

COUNT_SLOTS_HELD = "SELECT count(*) FROM gateway.tasks WHERE concurrency_key = $1 AND slot_held"

LOCK_WAITERS = f"""
    SELECT {COLUMNS} FROM gateway.tasks
    WHERE concurrency_key = $1 AND (status = 'pending' OR wants_slot)
    ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
"""

ANYTHING_OPEN = """
    SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE status IN ('pending', 'running'))
        OR EXISTS (SELECT 1 FROM gateway.tasks WHERE notify_state = 'pending')
        OR EXISTS (SELECT 1 FROM gateway.task_notifications WHERE state IN ('pending', 'attached'))
"""

SELECT_SLOT_HOLDERS = (
    "SELECT id, run_id FROM gateway.tasks WHERE status = 'running' AND slot_held ORDER BY queue_pos"
)

LOCK_SLOT_HOLDER = (
    f"SELECT {COLUMNS} FROM gateway.tasks WHERE id = $1 AND status = 'running' AND slot_held "
    "FOR UPDATE SKIP LOCKED"
)

HAS_OPEN_SUBTASKS_OR_NEWS = """
    SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE parent_task_id = $1
                   AND (status IN ('pending', 'running') OR notify_state = 'pending'))
        OR EXISTS (SELECT 1 FROM gateway.task_notifications
                   WHERE org_id = $2 AND parent_session_key = $3 AND state = 'pending')
"""

LOCK_EXPIRED_PENDING = f"""
    SELECT {COLUMNS} FROM gateway.tasks
    WHERE status = 'pending' AND created_at < now() - make_interval(secs => $1)
    ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
"""

#: Progress is the task's own (``progress_at``) or its run's last stored event.
LOCK_STALE_RUNNING = f"""
    SELECT {COLUMNS} FROM gateway.tasks t
    WHERE status = 'running' AND (slot_held OR wants_slot)
      AND greatest(progress_at, (SELECT e.created_at FROM gateway.run_events e
                                 WHERE e.run_id = t.run_id ORDER BY e.seq DESC LIMIT 1))
          < now() - make_interval(secs => $1)
    ORDER BY queue_pos LIMIT $2 FOR UPDATE SKIP LOCKED
"""

LOCK_WAITING_FOR_NOTHING = f"""
    SELECT {COLUMNS} FROM gateway.tasks t
    WHERE status = 'running' AND NOT slot_held AND NOT wants_slot
      AND NOT EXISTS (SELECT 1 FROM gateway.tasks c WHERE c.parent_task_id = t.id
                      AND (c.status IN ('pending', 'running') OR c.notify_state = 'pending'))
      AND NOT EXISTS (SELECT 1 FROM gateway.task_notifications n
                      WHERE n.org_id = t.org_id AND n.parent_session_key = t.session_key
                        AND n.state IN ('pending', 'attached'))
    ORDER BY queue_pos LIMIT $1 FOR UPDATE SKIP LOCKED
"""

SELECT_STATUSES = "SELECT id, status FROM gateway.tasks WHERE id = ANY($1::uuid[])"

SELECT_WAITING_KEYS = (
    "SELECT DISTINCT concurrency_key FROM gateway.tasks WHERE status = 'pending' OR wants_slot"
)

COUNT_SLOTS_BY_KEY = (
    "SELECT concurrency_key, count(*) AS n FROM gateway.tasks WHERE slot_held GROUP BY concurrency_key"
)

SELECT_PARENTS_OF_ACTIVE = """
    SELECT DISTINCT parent_session_id, org_id FROM gateway.tasks
    WHERE status IN ('pending', 'running') AND parent_session_id > $1
    ORDER BY parent_session_id LIMIT $2
"""

SELECT_TASK_BY_SESSION = (
    "SELECT id, status, slot_held, wants_slot, concurrency_key FROM gateway.tasks WHERE session_id = $1"
)

LOCK_IDLE_PARENT_TASK = f"""
    SELECT {COLUMNS} FROM gateway.tasks t WHERE id = $1 AND status = 'running' AND NOT slot_held
      AND NOT wants_slot
      AND NOT EXISTS (SELECT 1 FROM gateway.tasks c WHERE c.parent_task_id = t.id
                      AND (c.status IN ('pending', 'running') OR c.notify_state = 'pending'))
    FOR UPDATE SKIP LOCKED
"""

# ---------------------------------------------------------------- tasks: writes

INSERT_TASK = f"""
    INSERT INTO gateway.tasks (id, org_id, parent_session_id, parent_session_key, parent_agent_id,
        parent_task_id, depth, session_id, session_key, agent_id, description, prompt, model,
        max_tool_calls, concurrency_key, status, idempotency_key, request_hash, progress_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 'pending', $16, $17, now())
    RETURNING {COLUMNS}
"""

MARK_RUNNING = f"""
    UPDATE gateway.tasks SET status = 'running', slot_held = true, wants_slot = false, run_id = $2,
        attempt = $3, started_at = coalesce(started_at, clock_timestamp()), progress_at = now()
    WHERE id = $1 RETURNING {COLUMNS}
"""

END_TASKS = f"""
    UPDATE gateway.tasks SET status = $2, ended_at = now(), slot_held = false, wants_slot = false,
        error = coalesce($3, error), result = coalesce($4, result),
        notify_state = CASE WHEN $5 THEN 'pending' ELSE 'skipped' END
    WHERE id = ANY($1::uuid[]) AND status IN ('pending', 'running')
    RETURNING {COLUMNS}
"""

SKIP_NEWS_OF_SESSIONS = (
    "UPDATE gateway.tasks SET notify_state = 'skipped' "
    "WHERE org_id = $1 AND parent_session_id = ANY($2::uuid[]) AND notify_state = 'pending'"
)

RETURN_SLOT_KEEP_RUNNING = (
    "UPDATE gateway.tasks SET slot_held = false, result = $2, runs_completed = runs_completed + 1, "
    "progress_at = now() WHERE id = $1"
)

COUNT_RUN_COMPLETED = "UPDATE gateway.tasks SET runs_completed = runs_completed + 1 WHERE id = $1"

SET_EXCLUDE_MODELS = f"UPDATE gateway.tasks SET exclude_models = $2 WHERE id = $1 RETURNING {COLUMNS}"

WANT_SLOT = "UPDATE gateway.tasks SET wants_slot = true, progress_at = now() WHERE id = $1"

MOVE_PARENT_SESSION = (
    "UPDATE gateway.tasks SET parent_session_id = $3 WHERE org_id = $1 AND parent_session_id = $2"
)
MOVE_OWN_SESSION = "UPDATE gateway.tasks SET session_id = $3 WHERE org_id = $1 AND session_id = $2"

# ---------------------------------------------------------------- notices

SELECT_NOTICES = (
    "SELECT task_id, attempt, message, created_at FROM gateway.task_notices "
    "WHERE task_id = ANY($1::uuid[]) ORDER BY id"
)

INSERT_NOTICE = (
    "INSERT INTO gateway.task_notices (task_id, attempt, fingerprint, message) VALUES ($1, $2, $3, $4) "
    "ON CONFLICT DO NOTHING"
)

# ---------------------------------------------------------------- notifications

_LOCK_PENDING_NEWS = (
    "SELECT id, message, failed_deliveries FROM gateway.task_notifications "
    "WHERE org_id = $1 AND parent_session_key = $2 AND state = 'pending' "
    "ORDER BY created_at FOR UPDATE"
)
LOCK_PENDING_NEWS = _LOCK_PENDING_NEWS
LOCK_PENDING_NEWS_SKIP_LOCKED = _LOCK_PENDING_NEWS + " SKIP LOCKED"

HAS_PENDING_NEWS = (
    "SELECT EXISTS (SELECT 1 FROM gateway.task_notifications "
    "WHERE org_id = $1 AND parent_session_key = $2 AND state = 'pending')"
)

ATTACH_NEWS = (
    "UPDATE gateway.task_notifications SET state = 'attached', run_id = $2 WHERE id = ANY($1::uuid[])"
)

DROP_NEWS_OF_SESSIONS = (
    "UPDATE gateway.task_notifications SET state = 'dropped' "
    "WHERE org_id = $1 AND parent_session_id = ANY($2::uuid[]) AND state = 'pending'"
)

#: For the sessions of tasks that ended (any org: the ids are the tasks' own).
DROP_NEWS_FOR_TASK_SESSIONS = (
    "UPDATE gateway.task_notifications SET state = 'dropped' "
    "WHERE parent_session_id = ANY($1::uuid[]) AND state = 'pending'"
)

DROP_NEWS_OF_KEY = (
    "UPDATE gateway.task_notifications SET state = 'dropped' "
    "WHERE org_id = $1 AND parent_session_key = $2 AND state = 'pending'"
)
DROP_NEWS_OF_SESSION = (
    "UPDATE gateway.task_notifications SET state = 'dropped' "
    "WHERE org_id = $1 AND parent_session_id = $2 AND state = 'pending'"
)

SELECT_ATTACHED_NEWS = (
    "SELECT id, run_id FROM gateway.task_notifications "
    "WHERE state = 'attached' AND ($1::text IS NULL OR parent_session_key = $1)"
)

#: ($1, $2, $3): notification ids, the runs they were attached to, whether
#: that run completed. A notification attached again since (to another run) is left alone.
SETTLE_ATTACHED_NEWS = """
    UPDATE gateway.task_notifications n SET
        state = CASE WHEN o.completed THEN 'delivered' ELSE 'pending' END,
        delivered_at = CASE WHEN o.completed THEN now() END,
        run_id = CASE WHEN o.completed THEN n.run_id END,
        failed_deliveries = n.failed_deliveries + CASE WHEN o.completed THEN 0 ELSE 1 END
    FROM unnest($1::uuid[], $2::uuid[], $3::bool[]) AS o(id, run_id, completed)
    WHERE n.id = o.id AND n.state = 'attached' AND n.run_id = o.run_id
"""

SELECT_PARENTS_WITH_NEWS = """
    SELECT p.parent_session_id, extract(epoch FROM now() - p.first) AS age,
           EXISTS (SELECT 1 FROM gateway.tasks a WHERE a.parent_session_id = p.parent_session_id
                   AND a.status IN ('pending', 'running')) AS busy
    FROM (SELECT parent_session_id, min(ended_at) AS first FROM gateway.tasks
          WHERE notify_state = 'pending' GROUP BY parent_session_id) p
"""

LOCK_NEWS_OF_PARENT = f"""
    SELECT {COLUMNS} FROM gateway.tasks WHERE parent_session_id = $1 AND notify_state = 'pending'
    ORDER BY ended_at, queue_pos FOR UPDATE
"""

PARENT_HAS_ACTIVE_TASKS = (
    "SELECT EXISTS (SELECT 1 FROM gateway.tasks WHERE parent_session_id = $1 "
    "AND status IN ('pending', 'running'))"
)

AGE_SECONDS = "SELECT extract(epoch FROM now() - $1::timestamptz)"

#: The parent's round: every task reported since the last "all complete" message, plus $2.
CLOSE_ROUND = (
    "UPDATE gateway.tasks SET reported_complete = true WHERE parent_session_id = $1 "
    "AND NOT reported_complete AND (notify_state = 'batched' OR id = ANY($2::uuid[])) RETURNING status"
)

INSERT_NOTIFICATION = """
    INSERT INTO gateway.task_notifications (id, org_id, parent_session_id, parent_session_key, message,
        all_complete, state)
    VALUES ($1, $2, $3, $4, $5, $6, 'pending')
"""

MARK_BATCHED = (
    "UPDATE gateway.tasks SET notify_state = 'batched', notification_id = $2 WHERE id = ANY($1::uuid[])"
)

#: Only what may start a run now; the rest waits for the parent's next run
#: and must neither cost a query per pass nor crowd these out.
SELECT_DELIVERABLE = """
    SELECT n.org_id, n.parent_session_key, (array_agg(n.parent_session_id ORDER BY n.created_at DESC))[1] AS
           parent_session_id, bool_or(n.all_complete) AS final, max(n.failed_deliveries) AS failures
    FROM gateway.task_notifications n WHERE n.state = 'pending'
    GROUP BY n.org_id, n.parent_session_key
    HAVING n.parent_session_key LIKE $2
        OR (bool_or(n.all_complete) AND max(n.failed_deliveries) < $3)
    ORDER BY min(n.created_at)
    LIMIT $1
"""

MOVE_NEWS = (
    "UPDATE gateway.task_notifications SET parent_session_id = $3 "
    "WHERE org_id = $1 AND parent_session_id = $2 AND state IN ('pending', 'attached')"
)

# ---------------------------------------------------------------- session ends (the gateway outbox)

LOCK_SESSION_END_CURSOR = (
    "SELECT after_pos FROM gateway.task_cursors WHERE name = 'session_end' FOR UPDATE SKIP LOCKED"
)

#: Only positions every writer has finished with (runyard.common.outbox).
SELECT_OUTBOX_TOP = f"SELECT max(pos) FROM gateway.outbox WHERE pos < {HORIZON_SQL}"

SELECT_SESSION_ENDS = (
    "SELECT pos, data FROM gateway.outbox WHERE pos > $1 AND pos <= $2 AND type = 'session.end' "
    "ORDER BY pos LIMIT $3"
)

SET_SESSION_END_CURSOR = (
    "UPDATE gateway.task_cursors SET after_pos = $1, updated_at = now() WHERE name = 'session_end'"
)

Conn = db.Executor


class TaskStore:
    """Runs the statements above.

    Args:
        pool: the gateway's pool.
    """

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    # ------------------------------------------------------------ locks

    @staticmethod
    async def xact_lock(conn: db.Connection, name: str) -> None:
        """Take the transaction-scoped advisory lock ``name`` (safe with pooled connections)."""
        await conn.execute(XACT_LOCK, name)

    # ------------------------------------------------------------ reads

    async def by_idempotency_key(self, conn: Conn, org_id: str, key: str) -> asyncpg.Record | None:
        return await conn.fetchrow(SELECT_BY_IDEMPOTENCY_KEY, org_id, key)

    async def task_of_session(self, org_id: str, session_id: uuid.UUID) -> asyncpg.Record | None:
        """``(id, status, depth)`` of the task whose own session is ``session_id``."""
        return await self.pool.fetchrow(SELECT_TASK_OF_SESSION, session_id, org_id)

    async def status_for_share(self, conn: db.Connection, task_id: uuid.UUID) -> str | None:
        """A task's status, locked against ending (FOR SHARE) until the transaction ends."""
        status: str | None = await conn.fetchval(SELECT_STATUS_FOR_SHARE, task_id)
        return status

    async def active_children(self, conn: Conn, parent_id: uuid.UUID) -> int:
        return int(await conn.fetchval(COUNT_ACTIVE_CHILDREN, parent_id))

    async def get(
        self, org_id: str, task_id: uuid.UUID, parent_session_key: str | None
    ) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SELECT_TASK, task_id, org_id, parent_session_key)

    async def page(
        self,
        org_id: str,
        parent_session_id: uuid.UUID,
        after: tuple[dt.datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        """Up to ``limit`` tasks of a parent after ``after`` (created_at, id)."""
        return list(
            await self.pool.fetch(
                SELECT_PAGE,
                org_id,
                parent_session_id,
                after[0] if after else None,
                after[1] if after else None,
                limit,
            )
        )

    async def exists(self, conn: db.Connection, org_id: str, task_id: uuid.UUID) -> bool:
        return await conn.fetchval(TASK_EXISTS, task_id, org_id) is not None

    async def lock_tree_of_task(self, conn: db.Connection, org_id: str, task_id: uuid.UUID) -> list[Any]:
        """Lock a task and every active task below it (active ones returned, oldest first)."""
        return list(await conn.fetch(LOCK_TREE_OF_TASK, org_id, task_id))

    async def lock_trees_of_sessions(
        self, conn: db.Connection, org_id: str, session_ids: Sequence[uuid.UUID]
    ) -> list[Any]:
        """Lock the active tasks under or of ``session_ids`` and every active task below them."""
        return list(await conn.fetch(LOCK_TREES_OF_SESSIONS, org_id, list(session_ids)))

    async def lock_trees_below(
        self, conn: db.Connection, org_id: str, task_ids: Sequence[uuid.UUID]
    ) -> list[Any]:
        """Lock the active subtasks of ``task_ids`` and every active task below them."""
        return list(await conn.fetch(LOCK_TREES_BELOW_TASKS, org_id, list(task_ids)))

    async def slots_held(self, conn: db.Connection, key: str) -> int:
        return int(await conn.fetchval(COUNT_SLOTS_HELD, key))

    async def lock_waiters(self, conn: db.Connection, key: str, limit: int) -> list[Any]:
        """Lock the oldest ``limit`` tasks waiting for a slot of ``key`` (others' locks skipped)."""
        return list(await conn.fetch(LOCK_WAITERS, key, limit))

    async def anything_open(self) -> bool:
        """Whether any task is active or any notification is still open."""
        return bool(await self.pool.fetchval(ANYTHING_OPEN))

    async def slot_holders(self) -> list[asyncpg.Record]:
        """``(id, run_id)`` of every running task holding a slot, in queue order."""
        return list(await self.pool.fetch(SELECT_SLOT_HOLDERS))

    async def lock_slot_holder(self, conn: db.Connection, task_id: uuid.UUID) -> asyncpg.Record | None:
        return await conn.fetchrow(LOCK_SLOT_HOLDER, task_id)

    async def has_open_subtasks_or_news(self, conn: db.Connection, row: Any) -> bool:
        """Whether task ``row`` has active subtasks, or news (of ended ones) not delivered yet."""
        return bool(
            await conn.fetchval(HAS_OPEN_SUBTASKS_OR_NEWS, row["id"], row["org_id"], row["session_key"])
        )

    async def lock_expired_pending(self, conn: db.Connection, ttl_s: float) -> list[Any]:
        return list(await conn.fetch(LOCK_EXPIRED_PENDING, ttl_s, BATCH))

    async def lock_stale_running(self, conn: db.Connection, stale_s: float) -> list[Any]:
        return list(await conn.fetch(LOCK_STALE_RUNNING, stale_s, BATCH))

    async def lock_waiting_for_nothing(self, conn: db.Connection) -> list[Any]:
        return list(await conn.fetch(LOCK_WAITING_FOR_NOTHING, BATCH))

    async def statuses(self, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
        if not task_ids:
            return {}
        return {r["id"]: r["status"] for r in await self.pool.fetch(SELECT_STATUSES, list(task_ids))}

    async def waiting_keys(self) -> list[str]:
        return [r["concurrency_key"] for r in await self.pool.fetch(SELECT_WAITING_KEYS)]

    async def slots_by_key(self) -> dict[str, int]:
        return {r["concurrency_key"]: r["n"] for r in await self.pool.fetch(COUNT_SLOTS_BY_KEY)}

    async def parents_of_active(self, after: uuid.UUID) -> list[asyncpg.Record]:
        """``(parent_session_id, org_id)`` of active tasks, parent ids above ``after``, in order."""
        return list(await self.pool.fetch(SELECT_PARENTS_OF_ACTIVE, after, BATCH))

    async def task_by_session(self, session_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(SELECT_TASK_BY_SESSION, session_id)

    async def lock_idle_parent_task(self, conn: db.Connection, task_id: uuid.UUID) -> asyncpg.Record | None:
        """The running task ``task_id`` when it holds no slot, wants none and has no open subtask (locked)."""
        return await conn.fetchrow(LOCK_IDLE_PARENT_TASK, task_id)

    # ------------------------------------------------------------ writes

    async def insert(self, conn: db.Connection, *values: Any) -> asyncpg.Record:
        """Insert a PENDING task (the 17 values of :data:`INSERT_TASK`, in order)."""
        return db.returned(await conn.fetchrow(INSERT_TASK, *values))

    async def mark_running(
        self, conn: db.Connection, task_id: uuid.UUID, run_id: uuid.UUID, attempt: int
    ) -> asyncpg.Record:
        return db.returned(await conn.fetchrow(MARK_RUNNING, task_id, run_id, attempt))

    async def end(
        self,
        conn: db.Connection,
        task_ids: Sequence[uuid.UUID],
        status: TaskStatus,
        *,
        error: bytes | None,
        result: str | None,
        notify: bool,
    ) -> list[Any]:
        """End those of ``task_ids`` still active; returns the ended rows."""
        return list(await conn.fetch(END_TASKS, list(task_ids), status, error, result, notify))

    async def skip_news_of_sessions(
        self, conn: db.Connection, org_id: str, session_ids: Sequence[uuid.UUID]
    ) -> None:
        """Drop the news for ``session_ids``: both what is not batched yet and what is."""
        await conn.execute(SKIP_NEWS_OF_SESSIONS, org_id, list(session_ids))
        await conn.execute(DROP_NEWS_OF_SESSIONS, org_id, list(session_ids))

    async def drop_news_for_task_sessions(
        self, conn: db.Connection, session_ids: Sequence[uuid.UUID]
    ) -> None:
        await conn.execute(DROP_NEWS_FOR_TASK_SESSIONS, list(session_ids))

    async def return_slot_keep_running(self, conn: db.Connection, task_id: uuid.UUID, result: str) -> None:
        await conn.execute(RETURN_SLOT_KEEP_RUNNING, task_id, result)

    async def count_run_completed(self, conn: db.Connection, task_id: uuid.UUID) -> None:
        await conn.execute(COUNT_RUN_COMPLETED, task_id)

    async def set_exclude_models(
        self, conn: db.Connection, task_id: uuid.UUID, models: Sequence[str]
    ) -> asyncpg.Record:
        return db.returned(await conn.fetchrow(SET_EXCLUDE_MODELS, task_id, list(models)))

    async def want_slot(self, conn: db.Connection, task_id: uuid.UUID) -> None:
        await conn.execute(WANT_SLOT, task_id)

    async def follow_compaction(
        self, conn: db.Connection, org_id: str, old: uuid.UUID, new: uuid.UUID
    ) -> None:
        """Tasks and their open notifications move to the conversation's new session id."""
        await conn.execute(MOVE_PARENT_SESSION, org_id, old, new)
        await conn.execute(MOVE_OWN_SESSION, org_id, old, new)
        await conn.execute(MOVE_NEWS, org_id, old, new)

    # ------------------------------------------------------------ notices

    async def notices(self, conn: Conn, task_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[Any]]:
        """Task id -> its notices, oldest first."""
        out: dict[uuid.UUID, list[Any]] = {}
        for row in await conn.fetch(SELECT_NOTICES, list(task_ids)):
            out.setdefault(row["task_id"], []).append(row)
        return out

    async def record_notices(
        self, conn: db.Connection, task_id: uuid.UUID, attempt: int, texts: Iterable[str]
    ) -> int:
        """Store the distinct notices of one attempt (alike after
        :func:`~runyard.gateway.tasks.model.normalise_notice`); returns how many were new."""
        new = 0
        seen: set[str] = set()
        for text in texts:
            fingerprint = hashlib.sha256(normalise_notice(text).encode()).hexdigest()[:32]
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            status = await conn.execute(INSERT_NOTICE, task_id, attempt, fingerprint, text[:1000])
            new += int(status.split()[-1])
        return new

    # ------------------------------------------------------------ notifications

    async def lock_pending_news(
        self, conn: db.Connection, org_id: str, key: str, *, skip_locked: bool = False
    ) -> list[Any]:
        """Lock the pending notifications for session key ``key``, oldest first."""
        sql = LOCK_PENDING_NEWS_SKIP_LOCKED if skip_locked else LOCK_PENDING_NEWS
        return list(await conn.fetch(sql, org_id, key))

    async def has_pending_news(self, org_id: str, key: str) -> bool:
        return bool(await self.pool.fetchval(HAS_PENDING_NEWS, org_id, key))

    async def attach_news(self, conn: db.Connection, notes: Sequence[Any], run_id: uuid.UUID) -> None:
        """Mark ``notes`` as carried by run ``run_id`` (delivered once it completes)."""
        if notes:
            await conn.execute(ATTACH_NEWS, [n["id"] for n in notes], run_id)

    async def attached_news(self, conn: db.Connection, session_key: str | None) -> list[asyncpg.Record]:
        """``(id, run_id)`` of notifications carried by a run (for ``session_key``, or all)."""
        return list(await conn.fetch(SELECT_ATTACHED_NEWS, session_key))

    async def settle_attached_news(
        self, conn: db.Connection, outcomes: Sequence[tuple[uuid.UUID, uuid.UUID, bool]]
    ) -> None:
        """``(notification id, run id, run completed)``: delivered, or pending again."""
        if outcomes:
            ids, runs, completed = zip(*outcomes, strict=True)
            await conn.execute(SETTLE_ATTACHED_NEWS, list(ids), list(runs), list(completed))

    async def parents_with_news(self) -> list[asyncpg.Record]:
        """Per parent with ended tasks not batched: its id, the age of the oldest, whether it is busy."""
        return list(await self.pool.fetch(SELECT_PARENTS_WITH_NEWS))

    async def lock_news_of_parent(self, conn: db.Connection, parent_id: uuid.UUID) -> list[Any]:
        return list(await conn.fetch(LOCK_NEWS_OF_PARENT, parent_id))

    async def parent_has_active_tasks(self, conn: db.Connection, parent_id: uuid.UUID) -> bool:
        return bool(await conn.fetchval(PARENT_HAS_ACTIVE_TASKS, parent_id))

    async def age_s(self, conn: db.Connection, since: dt.datetime) -> float:
        """Seconds from ``since`` to the database's ``now()``."""
        return float(await conn.fetchval(AGE_SECONDS, since))

    async def close_round(
        self, conn: db.Connection, parent_id: uuid.UUID, ids: Sequence[uuid.UUID]
    ) -> list[str]:
        """Statuses of the parent's round (see :data:`CLOSE_ROUND`), now reported."""
        return [r["status"] for r in await conn.fetch(CLOSE_ROUND, parent_id, list(ids))]

    async def insert_notification(self, conn: db.Connection, *values: Any) -> None:
        """The 6 values of :data:`INSERT_NOTIFICATION`, in order."""
        await conn.execute(INSERT_NOTIFICATION, *values)

    async def mark_batched(
        self, conn: db.Connection, ids: Sequence[uuid.UUID], notification_id: uuid.UUID
    ) -> None:
        await conn.execute(MARK_BATCHED, list(ids), notification_id)

    async def deliverable(self, limit: int, key_pattern: str, max_runs: int) -> list[asyncpg.Record]:
        return list(await self.pool.fetch(SELECT_DELIVERABLE, limit, key_pattern, max_runs))

    async def drop_news(self, org_id: str, *, key: str = "", parent_id: uuid.UUID | None = None) -> str:
        """Drop pending notifications for session key ``key`` or session
        ``parent_id``; returns how many (as a string, from the command tag)."""
        if key:
            status = await self.pool.execute(DROP_NEWS_OF_KEY, org_id, key)
        else:
            status = await self.pool.execute(DROP_NEWS_OF_SESSION, org_id, parent_id)
        return str(status.split()[-1])

    # ------------------------------------------------------------ session ends

    async def lock_session_end_cursor(self, conn: db.Connection) -> int | None:
        """The cursor's position, locked (None when another replica holds it)."""
        position: int | None = await conn.fetchval(LOCK_SESSION_END_CURSOR)
        return position

    async def outbox_top(self, conn: db.Connection) -> int | None:
        top: int | None = await conn.fetchval(SELECT_OUTBOX_TOP)
        return top

    async def session_ends(self, conn: db.Connection, after: int, top: int, limit: int) -> list[Any]:
        return list(await conn.fetch(SELECT_SESSION_ENDS, after, top, limit))

    async def set_session_end_cursor(self, conn: db.Connection, position: int) -> None:
        await conn.execute(SET_SESSION_END_CURSOR, position)
