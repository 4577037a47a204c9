//! Queries on `api_keys`.

use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper, prelude::*};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::db;
use super::schema::{api_keys, tenants};

/// One row of `api_keys`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg))]
pub struct ApiKeyRow {
    pub id: String,
    pub name: String,
    pub role: String,
    pub tenant_id: Option<Uuid>,
    pub secret_sha256: Vec<u8>,
    pub rate_limit_per_second: Option<i32>,
    pub is_bootstrap: bool,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
    pub client_name: Option<String>,
}

/// A key to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = api_keys)]
pub struct NewApiKey {
    pub id: String,
    pub name: String,
    pub role: String,
    pub tenant_id: Option<Uuid>,
    pub secret_sha256: Vec<u8>,
    pub rate_limit_per_second: Option<i32>,
    pub is_bootstrap: bool,
    pub created_at: DateTime<Utc>,
    pub expire_time: Option<DateTime<Utc>>,
    pub client_name: Option<String>,
}

pub async fn insert(conn: &mut AsyncPgConnection, key: &NewApiKey) -> QueryResult<ApiKeyRow> {
    diesel::insert_into(api_keys::table)
        .values(key)
        .returning(ApiKeyRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
}

/// Loads a key for verification and records that it was used, in one round
/// trip. Verification is cached, so this runs at most once per key and cache
/// period on each replica.
pub async fn load_for_use(
    conn: &mut AsyncPgConnection,
    id: &str,
    now: DateTime<Utc>,
) -> QueryResult<Option<ApiKeyRow>> {
    diesel::update(api_keys::table.find(id))
        .set(api_keys::last_used_at.eq(now))
        .returning(ApiKeyRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
        .optional()
}

pub async fn list(conn: &mut AsyncPgConnection) -> QueryResult<Vec<ApiKeyRow>> {
    api_keys::table
        .order_by(api_keys::created_at.asc())
        .select(ApiKeyRow::as_select())
        .load(conn)
        .await
}

/// A page of keys in id order, after the key `after`: at most `limit`,
/// and whether more follow. Revoked and expired keys only when `revoked`.
pub async fn page(
    conn: &mut AsyncPgConnection,
    after: &str,
    limit: i64,
    revoked: bool,
    now: DateTime<Utc>,
) -> QueryResult<(Vec<ApiKeyRow>, bool)> {
    let mut query = api_keys::table
        .filter(api_keys::id.gt(after))
        .order_by(api_keys::id.asc())
        .limit(limit + 1)
        .select(ApiKeyRow::as_select())
        .into_boxed();
    if !revoked {
        query = query.filter(api_keys::revoked_at.is_null()).filter(
            api_keys::expire_time
                .is_null()
                .or(api_keys::expire_time.gt(now)),
        );
    }
    let mut rows = query.load(conn).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(0));
    Ok((rows, more))
}

/// Revokes a key; `None` when no key has this id. Revoking twice keeps the
/// first revocation time.
pub async fn revoke(
    conn: &mut AsyncPgConnection,
    id: &str,
    now: DateTime<Utc>,
) -> QueryResult<Option<ApiKeyRow>> {
    let revoked = diesel::update(
        api_keys::table
            .find(id)
            .filter(api_keys::revoked_at.is_null()),
    )
    .set(api_keys::revoked_at.eq(now))
    .returning(ApiKeyRow::as_returning())
    .get_results(conn)
    .await
    .and_then(db::single)
    .optional()?;
    match revoked {
        Some(row) => Ok(Some(row)),
        None => api_keys::table
            .find(id)
            .select(ApiKeyRow::as_select())
            .first(conn)
            .await
            .optional(),
    }
}

/// Whether the tenant of a key is deleted: its keys then do not work.
pub async fn tenant_deleted(conn: &mut AsyncPgConnection, tenant: Uuid) -> QueryResult<bool> {
    tenants::table
        .find(tenant)
        .select(tenants::delete_time.is_not_null())
        .first(conn)
        .await
        .optional()
        .map(|deleted| deleted.unwrap_or(true))
}

/// Deletes every key of a tenant (its purge).
pub async fn delete_of_tenant(conn: &mut AsyncPgConnection, tenant: Uuid) -> QueryResult<usize> {
    diesel::delete(api_keys::table.filter(api_keys::tenant_id.eq(tenant)))
        .execute(conn)
        .await
}

pub async fn count(conn: &mut AsyncPgConnection) -> QueryResult<i64> {
    api_keys::table
        .count()
        .get_results(conn)
        .await
        .and_then(db::single)
}
