-- router schema: cooldown state shared by every router replica, and the
-- lifecycle-event outbox (model.failover). Owned by the router service only.

-- One row per cooldown key. An empty auth_profile means "every profile of
-- the provider", an empty model "every model of the profile" (see
-- services/router/cooldowns.py). Rows are written by the router's
-- background writer under a row lock; `version` grows by one per write so
-- replicas can tell a newer state from an older one (LISTEN/NOTIFY channel
-- runyard_router_cooldowns carries each changed row).
CREATE TABLE router.cooldowns (
    provider        text NOT NULL,
    auth_profile    text NOT NULL,
    model           text NOT NULL,
    health          text NOT NULL DEFAULT 'ok' CHECK (health IN ('ok', 'cooling', 'disabled')),
    -- end of the cooldown; NULL = not cooling
    until           timestamptz,
    -- failures in the current episode (0 after a success)
    failure_count   integer NOT NULL DEFAULT 0,
    last_reason     text NOT NULL DEFAULT '',
    last_message    text NOT NULL DEFAULT '',
    last_failure_at timestamptz,
    version         bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, auth_profile, model)
);
CREATE INDEX cooldowns_updated ON router.cooldowns (updated_at);

-- Lifecycle events (DDL of runyard.common.outbox.OUTBOX_DDL, schema router).
CREATE TABLE router.outbox (
    id         bigserial PRIMARY KEY,
    pos        bigint UNIQUE,
    type       text NOT NULL,
    org_id     text NOT NULL,
    session_id uuid,
    data       bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbox_unsequenced ON router.outbox (id) WHERE pos IS NULL;
