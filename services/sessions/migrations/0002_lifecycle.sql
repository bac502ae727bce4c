-- Lifecycle, compaction and maintenance (issue 4).

-- Instances: graceful stops are recorded; the lease index serves crash recovery.
ALTER TABLE sessions.instances ADD COLUMN shutdown_mode text;
CREATE INDEX instances_lease ON sessions.instances (lease_expires_at);

-- Snapshots: the head a pending transcript was built on (`based`: the writer
-- said which; a commit whose base is no longer the head is rebased), and the
-- compaction it carries (CompactionInfo bytes; the commit rolls the key over).
ALTER TABLE sessions.snapshots ADD COLUMN base_snapshot_id uuid;
ALTER TABLE sessions.snapshots ADD COLUMN based boolean NOT NULL DEFAULT false;
ALTER TABLE sessions.snapshots ADD COLUMN compaction bytea;
CREATE INDEX snapshots_session_kept ON sessions.snapshots (session_id, created_at DESC, id DESC)
    WHERE state = 'completed';
CREATE INDEX snapshots_pending_age ON sessions.snapshots (created_at) WHERE state = 'pending';

-- Maintenance: prune by last activity (every session, ended or not), cap per
-- (org, agent) keeping the most recently active.
CREATE INDEX sessions_last_active ON sessions.sessions (last_active_at, id);
CREATE INDEX sessions_agent_recent ON sessions.sessions (org_id, agent_id, last_active_at DESC, id DESC);
CREATE INDEX sessions_next ON sessions.sessions (next_session_id) WHERE next_session_id IS NOT NULL;

-- Outbox retention.
CREATE INDEX outbox_created ON sessions.outbox (created_at);

-- Scheduled jobs: one instance runs a job per interval (row lock on its row).
CREATE TABLE sessions.schedule (
    job         text PRIMARY KEY,
    last_run_at timestamptz NOT NULL DEFAULT 'epoch'
);
INSERT INTO sessions.schedule (job) VALUES ('maintenance');
