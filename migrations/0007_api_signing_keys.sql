-- The keys `sitegen serve` signs stream tokens and dashboard sessions with, when SITEGEN_API_SIGNING_KEY
-- is not set: random, created once by the first `serve` process, shared by all of them. A server-side
-- secret: never logged, never returned by any API. The newest row signs; every row verifies (rotation:
-- insert a new key, restart the `serve` processes, delete the old row after the session TTL, 12 h;
-- docs/api.md).
CREATE TABLE IF NOT EXISTS api_signing_keys (
    kid text PRIMARY KEY,
    key bytea NOT NULL CHECK (octet_length(key) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);
