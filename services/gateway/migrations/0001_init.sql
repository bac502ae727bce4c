-- gateway schema: the runs queue and run events. Owned by the gateway only.

CREATE TABLE gateway.runs (
    id                 uuid PRIMARY KEY,
    org_id             text NOT NULL,
    session_id         uuid NOT NULL,
    session_key        text NOT NULL,
    agent_id           text NOT NULL,
    status             text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    -- RunPayload bytes as accepted (unknown fields kept); token, epoch and
    -- attempt are filled in at each claim.
    payload            bytea NOT NULL,
    input_text         text NOT NULL,
    metadata           jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key    text,
    -- sha256 of the request that created the run (idempotent repeats must match)
    request_hash       bytea,
    multitask_strategy text NOT NULL DEFAULT 'ENQUEUE',
    -- FIFO order of the queue
    queue_pos          bigserial,
    -- bumped at every claim; results of an older epoch are refused
    epoch              bigint NOT NULL DEFAULT 0,
    -- executions started (1-based in RunStarted.attempt)
    attempt            integer NOT NULL DEFAULT 0,
    -- executions lost to a dead worker or lapsed lease; the run fails when
    -- this reaches max_attempts (a graceful release does not count)
    lost_count         integer NOT NULL DEFAULT 0,
    max_attempts       integer NOT NULL,
    worker_id          text,
    gateway_id         text,
    lease_expires_at   timestamptz,
    cancel_requested   boolean NOT NULL DEFAULT false,
    cancel_reason      text,
    -- highest run event seq written, and the worker's own counter for the
    -- current epoch (exactly-once resend after a gateway restart)
    last_seq           bigint NOT NULL DEFAULT 0,
    worker_seq         bigint NOT NULL DEFAULT 0,
    model              text,
    input_tokens       bigint NOT NULL DEFAULT 0,
    output_tokens      bigint NOT NULL DEFAULT 0,
    error              bytea,
    task_id            uuid,
    created_at         timestamptz NOT NULL DEFAULT now(),
    first_claimed_at   timestamptz,
    started_at         timestamptz,
    ended_at           timestamptz
);

CREATE UNIQUE INDEX runs_idempotency ON gateway.runs (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- At most one running run per session.
CREATE UNIQUE INDEX runs_one_running ON gateway.runs (session_id) WHERE status = 'running';
CREATE INDEX runs_queue ON gateway.runs (queue_pos) WHERE status = 'queued';
CREATE INDEX runs_session_active ON gateway.runs (session_id, queue_pos) WHERE status IN ('queued', 'running');
CREATE INDEX runs_session_page ON gateway.runs (session_id, created_at, id);
CREATE INDEX runs_lease ON gateway.runs (lease_expires_at) WHERE status = 'running';

CREATE TABLE gateway.run_events (
    run_id     uuid NOT NULL REFERENCES gateway.runs (id) ON DELETE CASCADE,
    seq        bigint NOT NULL,
    -- RunEvent bytes without run_id/session_id/seq (filled in on read)
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, seq)
);
