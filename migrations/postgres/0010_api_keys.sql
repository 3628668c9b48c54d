-- API keys' bookkeeping, apart from the tier configuration (which holds only the SHA-256
-- of each active key): when a key was created through the admin API, when it was revoked,
-- and when it was last used. Never holds a key itself.
CREATE TABLE api_key_usage (
    key_sha256   text        PRIMARY KEY,
    key_id       text        NOT NULL UNIQUE,
    created_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz
);
