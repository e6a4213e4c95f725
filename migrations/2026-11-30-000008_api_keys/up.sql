-- API keys for the gateway. Only a SHA-256 of each key is kept (keys are 256 random bits,
-- so a fast hash is enough); the key itself is shown once, when it is created. A revoked key
-- keeps its row for the record, and its name becomes free for a new key.
CREATE TABLE api_keys (
    id          BIGSERIAL PRIMARY KEY,
    name        TEXT NOT NULL CHECK (name <> '' AND length(name) <= 64),
    scope       TEXT NOT NULL CHECK (scope IN ('inference', 'admin')),
    -- The key's first characters, so a list can tell keys apart without showing them.
    prefix      TEXT NOT NULL,
    hash        BYTEA NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;
