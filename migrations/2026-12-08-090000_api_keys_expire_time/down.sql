DROP TRIGGER api_keys_changed ON api_keys;
CREATE TRIGGER api_keys_changed AFTER UPDATE ON api_keys
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.role IS DISTINCT FROM NEW.role
          OR OLD.tenant_id IS DISTINCT FROM NEW.tenant_id
          OR OLD.secret_sha256 IS DISTINCT FROM NEW.secret_sha256
          OR OLD.rate_limit_per_second IS DISTINCT FROM NEW.rate_limit_per_second)
    EXECUTE FUNCTION api_keys_notify();
ALTER TABLE api_keys DROP COLUMN expire_time;
