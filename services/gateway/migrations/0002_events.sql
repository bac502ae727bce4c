-- Lifecycle events served by WatchEvents (runyard.gateway.watch): the
-- gateway's outbox (its own run.* / message.* events, written with the run's
-- status change, and the events relayed from other services' outboxes), and
-- one cursor per relayed source, advanced in the same transaction as the
-- events it copied. Same shape as runyard.common.outbox.OUTBOX_DDL.

CREATE TABLE gateway.outbox (
    id         bigserial PRIMARY KEY,
    pos        bigint UNIQUE,
    type       text NOT NULL,
    org_id     text NOT NULL,
    session_id uuid,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_unsequenced ON gateway.outbox (id) WHERE pos IS NULL;
CREATE INDEX outbox_org_pos ON gateway.outbox (org_id, pos) WHERE pos IS NOT NULL;
CREATE INDEX outbox_created ON gateway.outbox (created_at);

CREATE TABLE gateway.event_cursors (
    source     text PRIMARY KEY,
    -- the source's last relayed event id (its own outbox position)
    after_id   bigint NOT NULL DEFAULT 0,
    updated_at timestamptz
);
