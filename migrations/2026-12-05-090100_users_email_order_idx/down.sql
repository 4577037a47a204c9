DROP INDEX CONCURRENTLY IF EXISTS users_tenant_email_order_idx;
