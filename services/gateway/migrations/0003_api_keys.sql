-- API keys of the public API (stored hashed; see runyard.gateway.keys).
CREATE TABLE gateway.api_keys (
    id            text PRIMARY KEY,
    org_id        text NOT NULL,
    name          text NOT NULL DEFAULT '',
    scopes        text[] NOT NULL,
    secret_sha256 bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE INDEX api_keys_org ON gateway.api_keys (org_id, created_at);
