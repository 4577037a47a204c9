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

diesel::allow_tables_to_appear_in_same_query!(api_keys, request_ids, tenants, users);
