-- Client-side tools (issue 13): a run waits for the client's tool results in
-- status 'requires_action', without a worker.

ALTER TABLE gateway.runs DROP CONSTRAINT runs_status_check;
ALTER TABLE gateway.runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('queued', 'running', 'requires_action', 'completed', 'failed', 'cancelled'));

-- While (and after) the run waits: where it continues from, a
-- runyard.v1.RunContinuation (the worker's, with the client's results added
-- as they arrive); the next claim sends it to the worker.
ALTER TABLE gateway.runs ADD COLUMN continuation bytea;
-- When a waiting run fails with TOOL_RESULTS_TIMEOUT.
ALTER TABLE gateway.runs ADD COLUMN action_expires_at timestamptz;

-- A waiting run is its session's active run: at most one running or
-- waiting run per session, and queued runs of the session wait behind it.
DROP INDEX gateway.runs_one_running;
CREATE UNIQUE INDEX runs_one_running ON gateway.runs (session_id) WHERE status IN ('running', 'requires_action');
DROP INDEX gateway.runs_session_active;
CREATE INDEX runs_session_active ON gateway.runs (session_id, queue_pos)
    WHERE status IN ('queued', 'running', 'requires_action');
CREATE INDEX runs_action_expiry ON gateway.runs (action_expires_at) WHERE status = 'requires_action';
