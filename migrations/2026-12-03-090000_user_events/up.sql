-- The change feed: one row per committed change to a user, written by
-- triggers in the transaction of the change, so that an event exists
-- exactly when its change committed, whatever path made it (the service,
-- an import, an operator's SQL).
--
-- Readers order events by commit, not by `seq`: a sequence number is
-- taken before its transaction commits, and transactions commit in any
-- order. Each reader's position is a pair of snapshots (pg_current_snapshot)
-- and a `seq` within them: the events whose transaction `xid` is visible in
-- the later snapshot and not in the earlier one committed between the two,
-- and are read in `seq` order (which is commit order for the events of one
-- user: a change to a user waits for the row lock of the one before).
CREATE TABLE user_events (
    seq          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The top-level transaction that wrote the event.
    xid          xid8        NOT NULL DEFAULT pg_current_xact_id(),
    tenant_id    uuid        NOT NULL,
    user_id      uuid        NOT NULL,
    -- users.v1.UserEventType: 1 created, 2 updated, 3 deactivated,
    -- 4 reactivated, 5 deleted, 6 undeleted, 7 purged.
    kind         smallint    NOT NULL CHECK (kind BETWEEN 1 AND 7),
    -- The proto field names of the fields the change changed.
    changed      text[]      NOT NULL DEFAULT '{}',
    -- users.updated_by of the change ('key:<id>' or 'user:<id>'), or ''.
    actor        text        NOT NULL DEFAULT '',
    -- When the change was made (the user's updated_at; the purge's time).
    time         timestamptz NOT NULL,
    -- The user after the change, as to_jsonb(users). NULL for a purge, and
    -- for every event of a user once it is purged: no personal data
    -- outlives the user.
    state        jsonb
);

-- Readers find the events that became visible between two snapshots by xid.
CREATE INDEX user_events_xid_idx ON user_events (xid);
-- Purging a user finds its events to erase them.
CREATE INDEX user_events_user_id_idx ON user_events (user_id);

-- The oldest position a reader may still resume from: every pruned event's
-- xid is below `xid`. One row.
CREATE TABLE user_events_horizon (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    xid      xid8    NOT NULL
);
INSERT INTO user_events_horizon (xid) VALUES ('0');

-- Where the relay to NATS JetStream has got to: the position after the
-- last event JetStream acknowledged, per stream.
CREATE TABLE user_events_relays (
    stream     text        PRIMARY KEY,
    position   text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The fields of `users` that events report, by their proto names, and
-- which of them differ between two versions of a user (`o` NULL: all that
-- are set).
CREATE FUNCTION user_changed_fields(o users, n users) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT array_remove(ARRAY[
        CASE WHEN n.reference   IS DISTINCT FROM COALESCE(o.reference, '')      THEN 'reference' END,
        CASE WHEN n.email       IS DISTINCT FROM COALESCE(o.email, '')          THEN 'email' END,
        CASE WHEN n.phone       IS DISTINCT FROM COALESCE(o.phone, '')          THEN 'phone' END,
        CASE WHEN n.first_name  IS DISTINCT FROM COALESCE(o.first_name, '')     THEN 'first_name' END,
        CASE WHEN n.last_name   IS DISTINCT FROM COALESCE(o.last_name, '')      THEN 'last_name' END,
        CASE WHEN n.locale      IS DISTINCT FROM COALESCE(o.locale, '')         THEN 'locale' END,
        CASE WHEN n.timezone    IS DISTINCT FROM COALESCE(o.timezone, '')       THEN 'timezone' END,
        CASE WHEN n.is_opted_in IS DISTINCT FROM COALESCE(o.is_opted_in, false) THEN 'is_opted_in' END,
        CASE WHEN n.active      IS DISTINCT FROM COALESCE(o.active, false)      THEN 'active' END,
        CASE WHEN n.custom_data IS DISTINCT FROM COALESCE(o.custom_data, '{}')  THEN 'custom_data' END,
        CASE WHEN n.avatar_url  IS DISTINCT FROM COALESCE(o.avatar_url, '')     THEN 'avatar_url' END,
        CASE WHEN n.delete_time IS DISTINCT FROM o.delete_time                  THEN 'delete_time' END,
        CASE WHEN n.expire_time IS DISTINCT FROM o.expire_time                  THEN 'expire_time' END
    ], NULL)
$$;

-- Statement triggers with transition tables: one INSERT ... SELECT per
-- statement, however many rows it wrote (a coalesced create, a batch).
CREATE FUNCTION user_events_of_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_events (tenant_id, user_id, kind, changed, actor, time, state)
    SELECT n.tenant_id, n.id, 1, user_changed_fields(NULL, n), n.updated_by, n.updated_at, to_jsonb(n)
    FROM new_rows n;
    RETURN NULL;
END
$$;

-- A change that changes no field (an upsert with the same values) writes
-- no event.
CREATE FUNCTION user_events_of_update() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO user_events (tenant_id, user_id, kind, changed, actor, time, state)
    SELECT n.tenant_id, n.id,
        CASE
            WHEN n.active AND NOT o.active THEN 4
            WHEN o.active AND NOT n.active THEN 3
            WHEN o.delete_time IS NULL AND n.delete_time IS NOT NULL THEN 5
            WHEN o.delete_time IS NOT NULL AND n.delete_time IS NULL THEN 6
            ELSE 2
        END,
        c.changed, n.updated_by, n.updated_at, to_jsonb(n)
    FROM new_rows n
    JOIN old_rows o ON o.tenant_id = n.tenant_id AND o.id = n.id
    CROSS JOIN LATERAL (SELECT user_changed_fields(o, n) AS changed) c
    WHERE cardinality(c.changed) > 0;
    RETURN NULL;
END
$$;

-- A purge: its event holds the id and tenant only, and every earlier event
-- of the user loses its personal data.
CREATE FUNCTION user_events_of_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE user_events e SET state = NULL, actor = ''
    FROM old_rows o
    WHERE e.user_id = o.id AND e.state IS NOT NULL;
    INSERT INTO user_events (tenant_id, user_id, kind, actor, time)
    SELECT o.tenant_id, o.id, 7, COALESCE(current_setting('users.actor', true), ''), statement_timestamp()
    FROM old_rows o;
    RETURN NULL;
END
$$;

CREATE TRIGGER user_events_insert AFTER INSERT ON users
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_events_of_insert();
CREATE TRIGGER user_events_update AFTER UPDATE ON users
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_events_of_update();
CREATE TRIGGER user_events_delete AFTER DELETE ON users
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION user_events_of_delete();
