-- Safe writes: soft deletion that ends in erasure, the actor of each user's
-- last change, and the outcomes of idempotent requests (AIP-155).

-- A deleted user keeps its row (and so its reference and email stay
-- reserved) until expire_time, when the service erases it. Both are NULL
-- for a live user.
ALTER TABLE users
    ADD COLUMN delete_time timestamptz,
    ADD COLUMN expire_time timestamptz,
    -- Who made the last change: 'key:<api key id>' or 'user:<user id>'.
    ADD COLUMN updated_by  text NOT NULL DEFAULT '',
    ADD CONSTRAINT users_deleted_until CHECK ((delete_time IS NULL) = (expire_time IS NULL));

-- Lists leave deleted users out, so their indexes hold live users only:
-- a count or an offset stays an index-only scan instead of visiting every
-- row to read its delete_time. (Lists with show_deleted, for admin tools,
-- are not served by these.) The unique indexes stay whole: a deleted
-- user's reference and email stay reserved.
DROP INDEX users_tenant_created_at_idx, users_tenant_updated_at_idx, users_tenant_email_idx,
    users_tenant_first_name_idx, users_tenant_last_name_idx, users_tenant_phone_idx,
    users_created_at_idx;
CREATE INDEX users_tenant_created_at_idx ON users (tenant_id, created_at, id) WHERE delete_time IS NULL;
CREATE INDEX users_tenant_updated_at_idx ON users (tenant_id, updated_at, id) WHERE delete_time IS NULL;
CREATE INDEX users_tenant_email_idx ON users (tenant_id, email, id) WHERE delete_time IS NULL;
CREATE INDEX users_tenant_first_name_idx ON users (tenant_id, first_name, id) WHERE delete_time IS NULL;
CREATE INDEX users_tenant_last_name_idx ON users (tenant_id, last_name, id) WHERE delete_time IS NULL;
CREATE INDEX users_tenant_phone_idx ON users (tenant_id, phone, id) WHERE delete_time IS NULL;
CREATE INDEX users_created_at_idx ON users (created_at, id) WHERE delete_time IS NULL;

-- The purge job's work list: only deleted users are in it.
CREATE INDEX users_expire_time_idx ON users (expire_time) WHERE expire_time IS NOT NULL;

-- A deleted tenant hides itself and its users; the users deleted with it
-- carry its delete_time, which is how UndeleteTenant tells them from users
-- deleted on their own before.
ALTER TABLE tenants
    ADD COLUMN delete_time timestamptz,
    ADD COLUMN expire_time timestamptz,
    ADD CONSTRAINT tenants_deleted_until CHECK ((delete_time IS NULL) = (expire_time IS NULL));

CREATE INDEX tenants_expire_time_idx ON tenants (expire_time) WHERE expire_time IS NOT NULL;

-- One row per successful mutating request that carried a request id: a
-- retry with the same id from the same caller gets `response` again instead
-- of a second effect. Written in the transaction of the request's write,
-- so it exists exactly when the write committed. Forgotten after
-- --request-id-retention.
CREATE TABLE request_ids (
    -- 'key:<api key id>' or 'user:<user id>': ids are per caller.
    caller      text        NOT NULL,
    request_id  uuid        NOT NULL,
    -- The gRPC method, for operators.
    method      text        NOT NULL,
    -- SHA-256 of the method and the request without its request_id: a reused
    -- id with another request is refused. NULL once erased.
    fingerprint bytea,
    -- The encoded response message. NULL once erased: a replay then answers
    -- NOT_FOUND, and no personal data remains.
    response    bytea,
    -- The tenant and the users the response is about, so that purging them
    -- finds and erases it.
    tenant_id   uuid,
    user_ids    uuid[]      NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (caller, request_id)
);

-- A record is written with every write that carries a request id, so its
-- indexes are few and cheap: purging a user finds its records by user_ids
-- (GIN), the purge job the expired ones by created_at (BRIN: rows arrive in
-- time order). Purging a tenant, which is rare, scans for its tenant_id.
CREATE INDEX request_ids_user_ids_idx ON request_ids USING gin (user_ids);
CREATE INDEX request_ids_created_at_idx ON request_ids USING brin (created_at);

-- No user is created in a deleted tenant, by any path. The tenant row is
-- locked as the foreign key would lock it, so an insert that runs while
-- the tenant is being deleted waits for that and then sees it deleted.
CREATE FUNCTION users_tenant_is_live() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT delete_time FROM tenants WHERE id = NEW.tenant_id FOR KEY SHARE) IS NOT NULL THEN
        RAISE EXCEPTION 'tenant % is deleted', NEW.tenant_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'users_tenant_live';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER users_tenant_live BEFORE INSERT ON users
    FOR EACH ROW EXECUTE FUNCTION users_tenant_is_live();
