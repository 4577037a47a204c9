-- Every replica caches a verified key for --key-cache-ttl. A change that
-- matters to a caller (revoked, another role, tenant, secret or rate
-- limit, or the key deleted) is told on the channel `api_keys` with the
-- key's id, on commit, so that every replica forgets the key at once; the
-- cache period stays the bound while a replica is not listening. The
-- lookup that records `last_used_at` tells nothing: otherwise every
-- replica's lookup would empty the others' caches in turn.

CREATE FUNCTION api_keys_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('api_keys', OLD.id);
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
          OR OLD.secret_sha256 IS DISTINCT FROM NEW.secret_sha256
          OR OLD.rate_limit_per_second IS DISTINCT FROM NEW.rate_limit_per_second)
    EXECUTE FUNCTION api_keys_notify();

CREATE TRIGGER api_keys_deleted AFTER DELETE ON api_keys
    FOR EACH ROW EXECUTE FUNCTION api_keys_notify();
