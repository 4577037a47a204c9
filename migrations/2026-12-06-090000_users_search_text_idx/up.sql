-- One trigram index over the text `search` covers: email, first name and
-- last name joined by newlines, the expression the store's search condition
-- names (src/store/users/list.rs, SEARCH_TEXT). A search reads one set of
-- posting lists instead of three, which it combined with a BitmapOr: at a
-- million users its first page took 2.2x as long as at ten thousand with
-- the three-column index, which this one replaces (BENCHMARKS.md, "Search").
-- The newline keeps a term from matching across two fields' boundary only
-- where the term has none; the store also keeps each field's own condition,
-- so a match is always a match of one field. `like`/`iLike` on one of the
-- three fields add the implied condition on this expression to use it.
-- The pending list is bounded to 256 kB, for the reason given where the
-- three-column index was built (2026-12-05-090500).
-- Built CONCURRENTLY, alone in a migration outside a transaction, so that
-- writes go on while a live table of millions of users is indexed. Should
-- it fail, Postgres leaves an INVALID index of this name behind: drop it
-- (DROP INDEX CONCURRENTLY <name>) and start the service again to retry.
CREATE INDEX CONCURRENTLY users_search_text_idx ON users USING gin ((email || E'\n' || first_name || E'\n' || last_name) gin_trgm_ops)
    WITH (gin_pending_list_limit = 256);
