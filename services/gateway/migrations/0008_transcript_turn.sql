-- The transcript turn a completed run's commit produced in its own session
-- (NULL when it landed elsewhere, e.g. a compaction's successor). A message
-- claimed as it is queued may then use the transcript read while resolving
-- its session, when the session's last completed run says it is current
-- (runyard.gateway.service, RunAssignment.transcript).
ALTER TABLE gateway.runs ADD COLUMN transcript_turn integer;
