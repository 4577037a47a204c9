-- Per-tenant counts of the users an unfiltered ListUsers counts (the live
-- ones: delete_time IS NULL), and of those of them that are active, kept
-- by triggers in the transaction of every change, whatever path made it
-- (the service, an import, an operator's SQL). The total of a tenant, or
-- of its active or inactive users, is then the sum of a few rows instead
-- of a count over every user, and as exact as a count(*) in the same
-- snapshot.
--
-- A tenant's counts are spread over 16 shards, one per backend
-- (pg_backend_pid() % 16), so that concurrent creates in one tenant update
-- different rows instead of queueing for one row's lock. A shard holds the
-- changes its backends made and can go negative (a user created on one
-- connection and deleted on another): only the sum means anything.
CREATE TABLE user_counts (
    -- A purged tenant's counts go with it. Its users are all deleted, and
    -- so counted nowhere, before the tenant row is: erasing them changes
    -- no count, so no trigger writes a count of a tenant that is gone.
    tenant_id uuid     NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    shard     smallint NOT NULL CHECK (shard BETWEEN 0 AND 15),
    -- Live users, and the live users that are active.
    users     bigint   NOT NULL,
    active    bigint   NOT NULL,
    PRIMARY KEY (tenant_id, shard)
)
-- Every counted change rewrites a row here; free room on each page keeps
-- those updates on their page (HOT), so the table stays small between
-- vacuums.
WITH (fillfactor = 50);

-- Statement triggers with transition tables, like the change feed's: one
-- INSERT ... ON CONFLICT per statement, however many rows it wrote (a
-- coalesced create, a batch), adding each tenant's deltas to this
-- backend's shard. Rows go in tenant order, so that two statements that
-- touch several tenants lock their shards in the same order.

CREATE FUNCTION user_counts_of_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_counts AS c (tenant_id, shard, users, active)
    SELECT n.tenant_id, pg_backend_pid() % 16, count(*), count(*) FILTER (WHERE n.active)
    FROM new_rows n
    WHERE n.delete_time IS NULL
    GROUP BY n.tenant_id
    ORDER BY n.tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE
        SET users = c.users + EXCLUDED.users, active = c.active + EXCLUDED.active;
    RETURN NULL;
END
$$;

-- Every row before (-1) and after (+1) the change, whatever changed:
-- deletion, undeletion, activity, even the tenant. Tenants whose counts
-- come out unchanged (a new name, an upsert with the same values) write
-- nothing.
CREATE FUNCTION user_counts_of_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_counts AS c (tenant_id, shard, users, active)
    SELECT d.tenant_id, pg_backend_pid() % 16, sum(d.users), sum(d.active)
    FROM (
        SELECT n.tenant_id, 1 AS users, n.active::int AS active
        FROM new_rows n WHERE n.delete_time IS NULL
        UNION ALL
        SELECT o.tenant_id, -1, -(o.active::int)
        FROM old_rows o WHERE o.delete_time IS NULL
    ) d
    GROUP BY d.tenant_id
    HAVING sum(d.users) <> 0 OR sum(d.active) <> 0
    ORDER BY d.tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE
        SET users = c.users + EXCLUDED.users, active = c.active + EXCLUDED.active;
    RETURN NULL;
END
$$;

-- The service erases deleted users only, which changes no count; an
-- operator's DELETE of live users does.
CREATE FUNCTION user_counts_of_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_counts AS c (tenant_id, shard, users, active)
    SELECT o.tenant_id, pg_backend_pid() % 16, -count(*), -count(*) FILTER (WHERE o.active)
    FROM old_rows o
    WHERE o.delete_time IS NULL
    GROUP BY o.tenant_id
    ORDER BY o.tenant_id
    ON CONFLICT (tenant_id, shard) DO UPDATE
        SET users = c.users + EXCLUDED.users, active = c.active + EXCLUDED.active;
    RETURN NULL;
END
$$;

-- The counts start from the users there are, with no write between the
-- count and the triggers: the lock lets readers on and holds writers
-- until the migration commits.
LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER user_counts_insert AFTER INSERT ON users
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_counts_of_insert();
CREATE TRIGGER user_counts_update AFTER UPDATE ON users
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_counts_of_update();
CREATE TRIGGER user_counts_delete AFTER DELETE ON users
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_counts_of_delete();

INSERT INTO user_counts (tenant_id, shard, users, active)
SELECT tenant_id, 0, count(*), count(*) FILTER (WHERE active)
FROM users
WHERE delete_time IS NULL
GROUP BY tenant_id;
