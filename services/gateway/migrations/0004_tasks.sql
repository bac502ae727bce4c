-- Background tasks (runyard.gateway.tasks): the tasks, their concurrency
-- queue, the parent notifications and the retry notices. Owned by the gateway.

CREATE TABLE gateway.tasks (
    id                 uuid PRIMARY KEY,
    org_id             text NOT NULL,
    -- The session that spawned the task (an ordinary session or a task's).
    parent_session_id  uuid NOT NULL,
    parent_session_key text NOT NULL,
    parent_agent_id    text NOT NULL,
    -- Set when the parent session is itself a task's session (subtask).
    parent_task_id     uuid,
    depth              integer NOT NULL,
    -- The child session the task runs in ("task:<id>").
    session_id         uuid NOT NULL,
    session_key        text NOT NULL,
    agent_id           text NOT NULL,
    description        text NOT NULL,
    prompt             text NOT NULL,
    model              text NOT NULL DEFAULT '',
    max_tool_calls     integer NOT NULL DEFAULT 0,
    -- "model:<provider/model>", "provider:<name>" or "default".
    concurrency_key    text NOT NULL,
    status             text NOT NULL
        CHECK (status IN ('pending', 'running', 'completed', 'error', 'cancelled', 'interrupted')),
    -- FIFO order of the per-key queue (spawn order).
    queue_pos          bigserial,
    -- The task holds one slot of its key (its current run is queued or running).
    slot_held          boolean NOT NULL DEFAULT false,
    -- A RUNNING task whose run completed while it had subtasks waits without
    -- a slot; once they ended it wants a slot again for its follow-up run.
    wants_slot         boolean NOT NULL DEFAULT false,
    -- The current (or last) run of the task.
    run_id             uuid,
    -- Runs started for the task: only ever goes up.
    attempt            integer NOT NULL DEFAULT 0,
    -- Runs of the task that completed (the first one answers the prompt).
    runs_completed     integer NOT NULL DEFAULT 0,
    -- Models the current attempt excludes (failed earlier, still cooling down).
    exclude_models     text[] NOT NULL DEFAULT '{}',
    result             text NOT NULL DEFAULT '',
    -- RunError bytes (ERROR, CANCELLED, INTERRUPTED).
    error              bytea,
    idempotency_key    text,
    request_hash       bytea,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    ended_at           timestamptz,
    -- Last sign of life the stale check compares against (start, new run,
    -- subtasks ended); run events count too (gateway.run_events).
    progress_at        timestamptz,
    -- Parent notification: 'none' until the task ends; then 'pending' (to be
    -- batched), 'batched' (in notification_id) or 'skipped' (no one to tell:
    -- the parent was deleted, reset or cancelled).
    notify_state       text NOT NULL DEFAULT 'none'
        CHECK (notify_state IN ('none', 'pending', 'batched', 'skipped')),
    notification_id    uuid,
    -- Counted in an "all tasks are complete" message already.
    reported_complete  boolean NOT NULL DEFAULT false
);

CREATE UNIQUE INDEX tasks_idempotency ON gateway.tasks (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX tasks_session ON gateway.tasks (session_id);
CREATE INDEX tasks_parent_page ON gateway.tasks (parent_session_id, created_at, id);
CREATE INDEX tasks_parent_task ON gateway.tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;
CREATE INDEX tasks_waiting ON gateway.tasks (concurrency_key, queue_pos) WHERE status = 'pending' OR wants_slot;
CREATE INDEX tasks_slots ON gateway.tasks (concurrency_key) WHERE slot_held;
CREATE INDEX tasks_active ON gateway.tasks (parent_session_id) WHERE status IN ('pending', 'running');
CREATE INDEX tasks_notify ON gateway.tasks (parent_session_id) WHERE notify_state = 'pending';
CREATE INDEX tasks_run ON gateway.tasks (run_id) WHERE status = 'running';
-- Runs of tasks (orphaned runs of ended tasks are cancelled by the sweep).
CREATE INDEX runs_task_active ON gateway.runs (task_id) WHERE task_id IS NOT NULL AND status IN ('queued', 'running');

-- One message to a parent session about one or more ended tasks. Delivered
-- with a run of the parent: 'pending' until a run carries it, 'attached'
-- while that run is active (run_id), 'delivered' once it completed (the
-- message is in the committed transcript), back to 'pending' if it did not.
CREATE TABLE gateway.task_notifications (
    id                 uuid PRIMARY KEY,
    org_id             text NOT NULL,
    parent_session_id  uuid NOT NULL,
    parent_session_key text NOT NULL,
    -- runyard.v1.Message bytes (ROLE_SYSTEM).
    message            bytea NOT NULL,
    all_complete       boolean NOT NULL,
    state              text NOT NULL CHECK (state IN ('pending', 'attached', 'delivered', 'dropped')),
    run_id             uuid,
    -- Runs that carried it and did not complete.
    failed_deliveries  integer NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    delivered_at       timestamptz
);
CREATE INDEX task_notifications_open ON gateway.task_notifications (org_id, parent_session_key, created_at)
    WHERE state IN ('pending', 'attached');
CREATE INDEX task_notifications_run ON gateway.task_notifications (run_id) WHERE state = 'attached';
-- Dropping a parent's open notifications (cascades, ended tasks) and moving
-- them along a compaction: the table keeps every delivered one.
CREATE INDEX task_notifications_parent ON gateway.task_notifications (parent_session_id)
    WHERE state IN ('pending', 'attached');

-- Distinct retry notices per task and attempt (fingerprint: the normalised message).
CREATE TABLE gateway.task_notices (
    -- insertion order
    id          bigserial,
    task_id     uuid NOT NULL REFERENCES gateway.tasks (id) ON DELETE CASCADE,
    attempt     integer NOT NULL,
    fingerprint text NOT NULL,
    message     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, fingerprint)
);

-- How far the task manager has read gateway.outbox for session.end events
-- (cascades for sessions reset or deleted by any path). Starts at the end.
CREATE TABLE gateway.task_cursors (
    name       text PRIMARY KEY,
    after_pos  bigint NOT NULL,
    updated_at timestamptz
);
INSERT INTO gateway.task_cursors (name, after_pos)
SELECT 'session_end', coalesce(max(pos), 0) FROM gateway.outbox;
