// The tables of `migrations/`, in the layout `diesel print-schema` writes.
// Written by hand with each migration; tests/api/schema.rs compares it with
// the catalog of the migrated database, column by column.

diesel::table! {
    tenants (id) {
        id -> Uuid,
        name -> Text,
        reference -> Text,
        is_default -> Bool,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        delete_time -> Nullable<Timestamptz>,
        expire_time -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    users (tenant_id, id) {
        tenant_id -> Uuid,
        id -> Uuid,
        reference -> Text,
        email -> Text,
        phone -> Text,
        first_name -> Text,
        last_name -> Text,
        locale -> Text,
        timezone -> Text,
        is_opted_in -> Bool,
        active -> Bool,
        custom_data -> Jsonb,
        avatar_url -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        delete_time -> Nullable<Timestamptz>,
        expire_time -> Nullable<Timestamptz>,
        updated_by -> Text,
    }
}

diesel::joinable!(users -> tenants (tenant_id));

diesel::table! {
    api_keys (id) {
        id -> Text,
        name -> Text,
        role -> Text,
        tenant_id -> Nullable<Uuid>,
        secret_sha256 -> Bytea,
        rate_limit_per_second -> Nullable<Int4>,
        is_bootstrap -> Bool,
        created_at -> Timestamptz,
        last_used_at -> Nullable<Timestamptz>,
        revoked_at -> Nullable<Timestamptz>,
        expire_time -> Nullable<Timestamptz>,
        client_name -> Nullable<Text>,
    }
}

diesel::joinable!(api_keys -> tenants (tenant_id));

diesel::table! {
    request_ids (caller, request_id) {
        caller -> Text,
        request_id -> Uuid,
        method -> Text,
        fingerprint -> Nullable<Bytea>,
        response -> Nullable<Bytea>,
        tenant_id -> Nullable<Uuid>,
        user_ids -> Array<Uuid>,
        created_at -> Timestamptz,
    }
}

/// Postgres types diesel has no name for.
pub mod sql_types {
    /// A 64-bit transaction id.
    #[derive(diesel::sql_types::SqlType)]
    #[diesel(postgres_type(name = "xid8"))]
    pub struct Xid8;
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::Xid8;

    user_events (seq) {
        seq -> Int8,
        xid -> Xid8,
        tenant_id -> Uuid,
        user_id -> Uuid,
        kind -> Int2,
        changed -> Array<Text>,
        actor -> Text,
        time -> Timestamptz,
        state -> Nullable<Jsonb>,
    }
}

diesel::table! {
    use diesel::sql_types::*;
    use super::sql_types::Xid8;

    user_events_horizon (only_row) {
        only_row -> Bool,
        xid -> Xid8,
    }
}

diesel::table! {
    user_events_relays (stream) {
        stream -> Text,
        position -> Text,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    user_counts (tenant_id, shard) {
        tenant_id -> Uuid,
        shard -> Int2,
        users -> Int8,
        active -> Int8,
    }
}

diesel::joinable!(user_counts -> tenants (tenant_id));

diesel::allow_tables_to_appear_in_same_query!(api_keys, request_ids, tenants, user_counts, users);
