-- A key may stop working at a time set when it is made (KeysService
-- CreateKey), as if revoked then: rotation without a revocation step.
-- Nullable and without a default: adding it rewrites nothing and the
-- release before, which does not know it, goes on writing rows without it.
ALTER TABLE api_keys ADD COLUMN expire_time timestamptz;

-- A change of it is told to every replica, as a revocation is.
DROP TRIGGER api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expire_time IS DISTINCT FROM NEW.expire_time
          OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
          OR OLD.secret_sha256 IS DISTINCT FROM NEW.secret_sha256
          OR OLD.rate_limit_per_second IS DISTINCT FROM NEW.rate_limit_per_second)
    EXECUTE FUNCTION api_keys_notify();
