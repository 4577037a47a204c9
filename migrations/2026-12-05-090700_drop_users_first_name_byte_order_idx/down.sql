CREATE INDEX CONCURRENTLY IF NOT EXISTS users_tenant_first_name_idx ON users (tenant_id, first_name, id) WHERE delete_time IS NULL;
