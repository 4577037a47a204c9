-- What the list indexes of the next migrations need, checked first so that
-- a server without it fails here with a message that says what to install,
-- rather than halfway through building indexes:
--  * the ICU collation "und-x-icu", in which lists order the text people
--    read (names, email, reference): case-insensitively and accent-aware.
--    It exists when Postgres was built with ICU (Debian's and most
--    distributions' packages are).
--  * the pg_trgm extension, whose trigram indexes serve `search` and
--    `like`/`iLike` patterns with a leading wildcard. It ships with
--    Postgres' contrib modules (Debian: part of the postgresql package;
--    elsewhere postgresql-contrib). It is a trusted extension: the
--    database's owner may create it without superuser rights.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu') THEN
        RAISE EXCEPTION 'the ICU collation "und-x-icu" is missing'
            USING HINT = 'users-service needs a PostgreSQL built with ICU support (--with-icu), as Debian''s packages are';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') THEN
        RAISE EXCEPTION 'the PostgreSQL extension pg_trgm is not installed on this server'
            USING HINT = 'install PostgreSQL''s contrib modules (Debian: the postgresql package; elsewhere postgresql-contrib)';
    END IF;
END
$$;

CREATE EXTENSION IF NOT EXISTS pg_trgm;
