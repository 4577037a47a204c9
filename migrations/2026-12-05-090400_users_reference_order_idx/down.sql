DROP INDEX CONCURRENTLY IF EXISTS users_tenant_reference_order_idx;
