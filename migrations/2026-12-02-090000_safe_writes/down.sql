DROP TRIGGER users_tenant_live ON users;
DROP FUNCTION users_tenant_is_live();
DROP TABLE request_ids;
DROP INDEX tenants_expire_time_idx;
ALTER TABLE tenants
    DROP CONSTRAINT tenants_deleted_until,
    DROP COLUMN expire_time,
    DROP COLUMN delete_time;
DROP INDEX users_expire_time_idx;
ALTER TABLE users
    DROP CONSTRAINT users_deleted_until,
    DROP COLUMN updated_by,
    DROP COLUMN expire_time,
    DROP COLUMN delete_time;
