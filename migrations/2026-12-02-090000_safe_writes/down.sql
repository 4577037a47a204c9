DROP TRIGGER users_tenant_live ON users;
DROP FUNCTION users_tenant_is_live();
DROP TABLE request_ids;
DROP INDEX tenants_expire_time_idx;
ALTER TABLE tenants
    DROP CONSTRAINT tenants_deleted_until,
    DROP COLUMN expire_time,
    DROP COLUMN delete_time;
DROP INDEX users_expire_time_idx;
DROP INDEX users_tenant_created_at_idx, users_tenant_updated_at_idx, users_tenant_email_idx,
    users_tenant_first_name_idx, users_tenant_last_name_idx, users_tenant_phone_idx,
    users_created_at_idx;
CREATE INDEX users_tenant_created_at_idx ON users (tenant_id, created_at, id);
CREATE INDEX users_tenant_updated_at_idx ON users (tenant_id, updated_at, id);
CREATE INDEX users_tenant_email_idx ON users (tenant_id, email, id);
CREATE INDEX users_tenant_first_name_idx ON users (tenant_id, first_name, id);
CREATE INDEX users_tenant_last_name_idx ON users (tenant_id, last_name, id);
CREATE INDEX users_tenant_phone_idx ON users (tenant_id, phone, id);
CREATE INDEX users_created_at_idx ON users (created_at, id);
ALTER TABLE users
    DROP CONSTRAINT users_deleted_until,
    DROP COLUMN updated_by,
    DROP COLUMN expire_time,
    DROP COLUMN delete_time;
