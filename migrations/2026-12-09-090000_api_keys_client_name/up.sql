-- A key may be bound to the client certificate that must carry it (mutual
-- TLS): the certificate's name (subject common name, else a URI or DNS
-- subject alternative name). A token copied off that client is refused
-- from anywhere else. Nullable and without a default: adding it rewrites
-- nothing, and the release before goes on writing rows without it.
ALTER TABLE api_keys ADD COLUMN client_name text;
