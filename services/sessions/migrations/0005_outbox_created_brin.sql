-- created_at of the outbox is read only by retention (the rows older than a
-- cutoff, oldest first); rows are appended in created_at order, so a BRIN
-- index serves it at no per-row cost, where a B-tree took an entry and its
-- WAL per event (issue 10; gateway migration 0010 does the same).
DROP INDEX sessions.outbox_created;
CREATE INDEX outbox_created ON sessions.outbox USING brin (created_at);
