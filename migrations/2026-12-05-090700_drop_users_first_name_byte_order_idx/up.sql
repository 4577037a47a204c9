-- The byte-order index of first_name, which no list uses any more (lists order it
-- by users_tenant_first_name_order_idx; email equality uses the unique index on
-- lower(email)): dropped so that writes stop maintaining it. CONCURRENTLY,
-- alone in a migration outside a transaction, for the reasons of the
-- previous migrations.
DROP INDEX CONCURRENTLY IF EXISTS users_tenant_first_name_idx;
