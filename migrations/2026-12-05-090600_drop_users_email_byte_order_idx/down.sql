CREATE INDEX CONCURRENTLY IF NOT EXISTS users_tenant_email_idx ON users (tenant_id, email, id) WHERE delete_time IS NULL;
