-- Fewer index entries per lifecycle event (issue 10). A run writes about six
-- events to gateway.outbox (message.received, run.queued, run.started,
-- run.completed, message.sent and the relayed session.updated), and every
-- index of the table gets an entry for each, in the run's WAL.
--
-- created_at is read only by retention (Outbox.trim: the rows older than a
-- cutoff). Rows are appended in created_at order, so a BRIN index serves
-- that range at no per-row cost (a block range is summarized once it is
-- full, by VACUUM), where a B-tree took an entry and its WAL per event
-- (https://www.postgresql.org/docs/15/brin-intro.html).
DROP INDEX gateway.outbox_created;
CREATE INDEX outbox_created ON gateway.outbox USING brin (created_at);

-- A relayed event's (source, position) is unique; the gateway's own events
-- (relayed_from NULL, five of the six) need no entry. Inserts name the
-- predicate in ON CONFLICT (runyard.common.outbox.Outbox.insert_sql).
CREATE UNIQUE INDEX outbox_relayed_only ON gateway.outbox (relayed_from, relayed_pos)
    WHERE relayed_from IS NOT NULL;
DROP INDEX gateway.outbox_relayed;
