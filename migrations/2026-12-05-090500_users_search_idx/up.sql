-- Trigram index of the fields `search` covers (email, first name, last
-- name): serves `search` and `like`/`iLike` patterns on them, wherever
-- their wildcards are (terms of 3 characters or more use it). One index for
-- the three, which a search's OR combines with a BitmapOr. It holds every
-- tenant: the tenant's condition filters its matches.
-- New entries wait in the index's pending list until it is merged, and
-- every search reads the whole list: with Postgres' default of 4 MB, a
-- search at a million users took 6-11 ms instead of 1.5-2 ms after some
-- thousand inserts. 256 kB bounds what a search reads there, and costs
-- inserts more frequent, smaller merges (BENCHMARKS.md, "Search").
-- Built CONCURRENTLY, so that writes go on while a live table of millions
-- of users is indexed (a rolling deploy): the migration runs outside a
-- transaction and holds exactly one statement (several statements in one
-- query string would run as one implicit transaction, which CONCURRENTLY
-- refuses). Should it fail, Postgres leaves an INVALID index of this name
-- behind: drop it (DROP INDEX CONCURRENTLY <name>) and start the service
-- again to retry.
CREATE INDEX CONCURRENTLY users_search_idx ON users USING gin (email gin_trgm_ops, first_name gin_trgm_ops, last_name gin_trgm_ops)
    WITH (gin_pending_list_limit = 256);
