CREATE INDEX CONCURRENTLY IF NOT EXISTS users_tenant_last_name_idx ON users (tenant_id, last_name, id) WHERE delete_time IS NULL;
