-- Transcripts as appended turns (issue 10): each committed run adds one row
-- holding only its own messages, so the bytes a turn writes do not grow with
-- the conversation. A session's transcript is its current turns in order
-- (each row is a serialized runyard.v1.Transcript; concatenated, they parse
-- as one). A compaction starts the successor session with a checkpoint turn
-- (summary, kept messages and the run's messages). A run has at most one
-- turn, ever (turns_run): that is its commit.

CREATE TABLE sessions.turns (
    session_id    uuid NOT NULL REFERENCES sessions.sessions (id) ON DELETE CASCADE,
    -- 1-based position in the session's transcript.
    turn          integer NOT NULL,
    run_id        uuid NOT NULL,
    epoch         bigint NOT NULL,
    org_id        text NOT NULL,
    -- current: part of the transcript; archived: kept after a reset or by
    -- maintenance, never served.
    state         text NOT NULL DEFAULT 'current' CHECK (state IN ('current', 'archived')),
    -- Carries a whole transcript (a compaction's start, or a migrated snapshot).
    checkpoint    boolean NOT NULL DEFAULT false,
    data          bytea NOT NULL,
    message_count integer NOT NULL,
    size_bytes    integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (session_id, turn)
);
CREATE UNIQUE INDEX turns_run ON sessions.turns (run_id);

ALTER TABLE sessions.sessions ADD COLUMN head_turn integer NOT NULL DEFAULT 0;
ALTER TABLE sessions.sessions ADD COLUMN transcript_bytes bigint NOT NULL DEFAULT 0;

-- Each session's committed snapshot becomes its checkpoint turn 1.
INSERT INTO sessions.turns (session_id, turn, run_id, epoch, org_id, checkpoint, data, message_count, size_bytes,
                            created_at)
SELECT s.id, 1, sn.run_id, sn.epoch, sn.org_id, true, sn.data, sn.message_count, sn.size_bytes,
       coalesce(sn.committed_at, sn.created_at)
FROM sessions.sessions s JOIN sessions.snapshots sn ON sn.id = s.head_snapshot_id AND sn.state = 'completed';
UPDATE sessions.sessions s SET head_turn = 1, transcript_bytes = t.size_bytes
FROM sessions.turns t WHERE t.session_id = s.id;
-- Archived snapshots (reset with archive_on_reset) stay archived, never served.
INSERT INTO sessions.turns (session_id, turn, run_id, epoch, org_id, state, checkpoint, data, message_count,
                            size_bytes, created_at)
SELECT sn.session_id, 1000000 + row_number() OVER (PARTITION BY sn.session_id ORDER BY sn.created_at, sn.id),
       sn.run_id, sn.epoch, sn.org_id, 'archived', true, sn.data, sn.message_count, sn.size_bytes, sn.created_at
FROM sessions.snapshots sn
WHERE sn.state = 'archived' AND NOT EXISTS (SELECT 1 FROM sessions.turns t WHERE t.run_id = sn.run_id);

ALTER TABLE sessions.sessions DROP COLUMN head_snapshot_id;
DROP TABLE sessions.snapshots;
