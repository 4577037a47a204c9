DROP INDEX CONCURRENTLY IF EXISTS users_tenant_last_name_order_idx;
