CREATE INDEX CONCURRENTLY IF NOT EXISTS users_search_idx ON users USING gin (email gin_trgm_ops, first_name gin_trgm_ops, last_name gin_trgm_ops)
    WITH (gin_pending_list_limit = 256);
