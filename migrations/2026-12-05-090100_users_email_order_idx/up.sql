-- Lists ordered by email, in the order people read (the ICU root collation:
-- letters, then accents, then case), one tenant's live users, id breaking ties.
-- Built CONCURRENTLY, so that writes go on while a live table of millions
-- of users is indexed (a rolling deploy): the migration runs outside a
-- transaction and holds exactly one statement (several statements in one
-- query string would run as one implicit transaction, which CONCURRENTLY
-- refuses). Should it fail, Postgres leaves an INVALID index of this name
-- behind: drop it (DROP INDEX CONCURRENTLY <name>) and start the service
-- again to retry.
CREATE INDEX CONCURRENTLY users_tenant_email_order_idx ON users (tenant_id, email COLLATE "und-x-icu", id) WHERE delete_time IS NULL;
