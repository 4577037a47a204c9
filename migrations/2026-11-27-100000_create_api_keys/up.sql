-- API keys of the services that call users-service.
--
-- A key is shown once as `usk_<id>_<secret>`; only the SHA-256 of the secret
-- is kept. The secret is 256 random bits, so a fast hash is the right tool:
-- a slow password KDF would only slow down every call.

CREATE TABLE api_keys (
    -- Public part of the token, 16 hex characters.
    id                    text        PRIMARY KEY,
    name                  text        NOT NULL DEFAULT '',
    role                  text        NOT NULL CHECK (role IN ('admin', 'editor', 'viewer')),
    -- Editors and viewers act for one tenant; admins for all.
    tenant_id             uuid        REFERENCES tenants (id),
    secret_sha256         bytea       NOT NULL,
    -- Calls per second for this key; NULL means the server default.
    rate_limit_per_second integer     CHECK (rate_limit_per_second > 0),
    -- The admin key the server creates on its first start.
    is_bootstrap          boolean     NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL DEFAULT now(),
    last_used_at          timestamptz,
    revoked_at            timestamptz,
    CONSTRAINT api_keys_tenant_matches_role
        CHECK ((role = 'admin') = (tenant_id IS NULL))
);

-- At most one bootstrap key, even when replicas start together.
CREATE UNIQUE INDEX api_keys_bootstrap_key ON api_keys (is_bootstrap) WHERE is_bootstrap;
