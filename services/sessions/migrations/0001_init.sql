-- sessions schema: sessions, their keys, transcript snapshots, activations
-- and the lifecycle-event outbox. Owned by the sessions service only.

CREATE TABLE sessions.sessions (
    id                      uuid PRIMARY KEY,
    org_id                  text NOT NULL,
    key                     text NOT NULL,
    agent_id                text NOT NULL,
    parent_session_id       uuid,
    resumed_from_session_id uuid,
    next_session_id         uuid,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    -- last run activity (idle expiry, pruning)
    last_active_at          timestamptz NOT NULL DEFAULT now(),
    ended_at                timestamptz,
    end_reason              text,
    message_count           bigint NOT NULL DEFAULT 0,
    head_snapshot_id        uuid,
    metadata                jsonb NOT NULL DEFAULT '{}'::jsonb
);

-- The key's current session is the one not ended: at most one per (org, key).
CREATE UNIQUE INDEX sessions_current_key ON sessions.sessions (org_id, key) WHERE ended_at IS NULL;
CREATE INDEX sessions_org_page ON sessions.sessions (org_id, created_at, id);
CREATE INDEX sessions_parent ON sessions.sessions (parent_session_id, created_at, id) WHERE parent_session_id IS NOT NULL;
CREATE INDEX sessions_idle ON sessions.sessions (last_active_at) WHERE ended_at IS NULL;

CREATE TABLE sessions.snapshots (
    id            uuid PRIMARY KEY,
    session_id    uuid NOT NULL REFERENCES sessions.sessions (id) ON DELETE CASCADE,
    org_id        text NOT NULL,
    run_id        uuid NOT NULL,
    epoch         bigint NOT NULL,
    -- pending: written by a worker; completed: accepted by the gateway;
    -- archived: kept after a reset or beyond keep_snapshots.
    state         text NOT NULL CHECK (state IN ('pending', 'completed', 'archived')),
    data          bytea NOT NULL,
    size_bytes    integer NOT NULL,
    message_count integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    committed_at  timestamptz,
    UNIQUE (run_id, epoch)
);
-- At most one completed snapshot per run.
CREATE UNIQUE INDEX snapshots_one_completed_per_run ON sessions.snapshots (run_id) WHERE state = 'completed';
CREATE INDEX snapshots_session ON sessions.snapshots (session_id, created_at);

-- Service instances and their liveness lease (activations are owned by one).
CREATE TABLE sessions.instances (
    instance_id      text PRIMARY KEY,
    started_at       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    stopped_at       timestamptz
);

-- One row per activation: session.start ... exactly one session.end.
CREATE TABLE sessions.activations (
    id                      bigserial PRIMARY KEY,
    session_id              uuid NOT NULL,
    org_id                  text NOT NULL,
    instance_id             text NOT NULL,
    start_reason            text NOT NULL,
    resumed_from_session_id uuid,
    started_at              timestamptz NOT NULL DEFAULT now(),
    ended_at                timestamptz,
    end_reason              text
);
CREATE UNIQUE INDEX activations_open ON sessions.activations (session_id) WHERE ended_at IS NULL;
CREATE INDEX activations_owner ON sessions.activations (instance_id) WHERE ended_at IS NULL;

-- Durable lifecycle events (runyard.common.outbox: `pos` is assigned in
-- commit order, so a reader resuming after `pos` misses nothing).
CREATE TABLE sessions.outbox (
    id         bigserial PRIMARY KEY,
    pos        bigint UNIQUE,
    type       text NOT NULL,
    org_id     text NOT NULL,
    session_id uuid,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_unsequenced ON sessions.outbox (id) WHERE pos IS NULL;
