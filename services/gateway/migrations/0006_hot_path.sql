-- The run hot path (issue 10).

-- Run events are stored in chunks: one row holds the consecutive events
-- seq .. last_seq of a run as a runyard.v1.RunEventBatch (field 1, each event
-- length-delimited). Existing one-event rows become one-event chunks.
CREATE FUNCTION pg_temp.varint(n bigint) RETURNS bytea LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    out bytea := ''::bytea;
BEGIN
    WHILE n >= 128 LOOP
        out := out || set_byte('\x00'::bytea, 0, ((n & 127) | 128)::int);
        n := n >> 7;
    END LOOP;
    RETURN out || set_byte('\x00'::bytea, 0, n::int);
END
$$;
ALTER TABLE gateway.run_events ADD COLUMN last_seq bigint;
UPDATE gateway.run_events SET last_seq = seq, data = '\x0a'::bytea || pg_temp.varint(length(data)) || data;
ALTER TABLE gateway.run_events ALTER COLUMN last_seq SET NOT NULL;

-- Events the gateway copies from the sessions and router outboxes: the
-- source and the event's position there. The gateway records some of them
-- with the change they belong to (a run's session.start, its
-- session.updated), and the relay skips them later.
ALTER TABLE gateway.outbox ADD COLUMN relayed_from text;
ALTER TABLE gateway.outbox ADD COLUMN relayed_pos bigint;
CREATE UNIQUE INDEX outbox_relayed ON gateway.outbox (relayed_from, relayed_pos);
