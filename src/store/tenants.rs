//! Queries on `tenants`.

use diesel::{
    BoolExpressionMethods, ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper, pg::Pg,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use chrono::{DateTime, Utc};
use diesel_async::AsyncConnection;

use super::filter::{Boxed, CursorValue, TextOp, UuidOp, text_condition, uuid_condition};
use super::models::Actor;
use super::models::{NewTenant, TenantChanges, TenantRow};
use super::page::{CursorMismatch, Page};
use super::schema::tenants;
use super::{api_keys, db, requests, users};

/// One condition of a tenant list; a list ANDs all of its conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Id(UuidOp),
    Reference(TextOp),
    /// Not deleted.
    Live,
}

/// What a page of tenants is made of; tenants are ordered by (created_at, id).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListQuery {
    pub conditions: Vec<Condition>,
    /// Keyset cursor: `[created_at micros, id]` of the last tenant already seen.
    pub after: Option<Vec<CursorValue>>,
    pub limit: i64,
    pub offset: i64,
    pub count_total: bool,
}

pub async fn insert(
    conn: &mut AsyncPgConnection,
    tenant: &NewTenant,
) -> diesel::QueryResult<TenantRow> {
    diesel::insert_into(tenants::table)
        .values(tenant)
        .returning(TenantRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
}

pub async fn find(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> diesel::QueryResult<Option<TenantRow>> {
    tenants::table
        .find(id)
        .select(TenantRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// The tenant that users created without a tenant land in.
pub async fn default_id(conn: &mut AsyncPgConnection) -> diesel::QueryResult<Uuid> {
    tenants::table
        .filter(tenants::is_default)
        .select(tenants::id)
        .first(conn)
        .await
}

/// Applies `changes`; `None` when no live tenant has this id.
pub async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    changes: &TenantChanges,
) -> diesel::QueryResult<Option<TenantRow>> {
    diesel::update(
        tenants::table
            .find(id)
            .filter(tenants::delete_time.is_null()),
    )
    .set(changes)
    .returning(TenantRow::as_returning())
    .get_results(conn)
    .await
    .and_then(db::single)
    .optional()
}

/// One page of tenants, with the total count when asked for.
pub async fn list(
    conn: &mut AsyncPgConnection,
    query: &ListQuery,
) -> diesel::QueryResult<Result<Page<TenantRow>, CursorMismatch>> {
    let after = match &query.after {
        Some(values) => match after_cursor(values) {
            Some(condition) => Some(condition),
            None => return Ok(Err(CursorMismatch)),
        },
        None => None,
    };
    let total = if query.count_total {
        Some(
            filtered(&query.conditions)
                .count()
                .get_results::<i64>(conn)
                .await
                .and_then(db::single)?,
        )
    } else {
        None
    };
    let mut rows_query = filtered(&query.conditions);
    if let Some(after) = after {
        rows_query = rows_query.filter(after);
    }
    let mut rows = rows_query
        .order_by((tenants::created_at.asc(), tenants::id.asc()))
        .select(TenantRow::as_select())
        .limit(query.limit + 1)
        .offset(query.offset)
        .load::<TenantRow>(conn)
        .await?;
    let next = if rows.len() as i64 > query.limit {
        rows.truncate(query.limit as usize);
        rows.last().map(|row| {
            vec![
                CursorValue::time(row.created_at),
                CursorValue::Text(row.id.to_string()),
            ]
        })
    } else {
        None
    };
    Ok(Ok(Page { rows, total, next }))
}

fn filtered(conditions: &[Condition]) -> tenants::BoxedQuery<'static, Pg> {
    let mut query = tenants::table.into_boxed();
    for condition in conditions {
        let expression: Boxed<tenants::table> = match condition {
            Condition::Id(op) => uuid_condition!(tenants::id, op),
            Condition::Reference(op) => text_condition!(tenants::reference, op),
            Condition::Live => Box::new(tenants::delete_time.is_null()),
        };
        query = query.filter(expression);
    }
    query
}

/// `(created_at, id) > (t, id)`: a row comparison that the
/// `(created_at, id)` index serves directly.
fn after_cursor(values: &[CursorValue]) -> Option<Boxed<tenants::table>> {
    let [CursorValue::Micros(micros), CursorValue::Text(id)] = values else {
        return None;
    };
    let created_at = chrono::DateTime::from_timestamp_micros(*micros)?;
    let id = Uuid::parse_str(id).ok()?;
    Some(Box::new(tenants::created_at.gt(created_at).or(
        tenants::created_at.eq(created_at).and(tenants::id.gt(id)),
    )))
}

/// What a change of a tenant's state did.
#[derive(Debug, Clone, PartialEq)]
pub enum TenantWritten {
    /// The tenant after the change.
    Changed(TenantRow),
    /// The tenant was erased, with all it held.
    Purged(Uuid),
    /// The default tenant: it cannot be deleted.
    Default,
    /// The change needs a deleted tenant and this one is live.
    Live,
    /// No tenant in the state the change needs has this id.
    Missing,
}

/// The tenant with this id, locked for the rest of the transaction.
async fn lock(conn: &mut AsyncPgConnection, id: Uuid) -> diesel::QueryResult<Option<TenantRow>> {
    tenants::table
        .find(id)
        .select(TenantRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Deletes a live tenant and its live users softly, until `until`.
pub async fn delete(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    at: DateTime<Utc>,
    until: DateTime<Utc>,
    by: &Actor,
) -> diesel::QueryResult<TenantWritten> {
    conn.transaction(async |conn| {
        match lock(conn, id).await? {
            Some(tenant) if tenant.is_default => return Ok(TenantWritten::Default),
            Some(tenant) if tenant.delete_time.is_none() => {}
            _ => return Ok(TenantWritten::Missing),
        }
        users::delete_tenant(conn, id, at, until, by).await?;
        set_deleted(conn, id, Some((at, until)), at).await
    })
    .await
}

/// Marks the tenant deleted (`Some((delete_time, expire_time))`) or live.
async fn set_deleted(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    deleted: Option<(DateTime<Utc>, DateTime<Utc>)>,
    at: DateTime<Utc>,
) -> diesel::QueryResult<TenantWritten> {
    diesel::update(tenants::table.find(id))
        .set((
            tenants::delete_time.eq(deleted.map(|(time, _)| time)),
            tenants::expire_time.eq(deleted.map(|(_, expiry)| expiry)),
            tenants::updated_at.eq(at),
        ))
        .returning(TenantRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
        .map(TenantWritten::Changed)
}

/// Restores a deleted tenant before its `expire_time`, with the users
/// deleted with it.
pub async fn undelete(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    at: DateTime<Utc>,
    by: &Actor,
) -> diesel::QueryResult<TenantWritten> {
    conn.transaction(async |conn| {
        let deleted_at = match lock(conn, id).await? {
            Some(TenantRow {
                delete_time: Some(deleted_at),
                expire_time: Some(expiry),
                ..
            }) if at < expiry => deleted_at,
            _ => return Ok(TenantWritten::Missing),
        };
        users::undelete_tenant(conn, id, deleted_at, at, by).await?;
        set_deleted(conn, id, None, at).await
    })
    .await
}

/// Erases a deleted tenant: its users, its keys, the stored responses about
/// it, and the tenant.
pub async fn purge(conn: &mut AsyncPgConnection, id: Uuid) -> diesel::QueryResult<TenantWritten> {
    conn.transaction(async |conn| {
        match lock(conn, id).await? {
            None => return Ok(TenantWritten::Missing),
            Some(tenant) if tenant.delete_time.is_none() => return Ok(TenantWritten::Live),
            Some(_) => {}
        }
        users::purge_tenant(conn, id).await?;
        api_keys::delete_of_tenant(conn, id).await?;
        requests::erase_tenant(conn, id).await?;
        diesel::delete(tenants::table.find(id))
            .execute(conn)
            .await?;
        Ok(TenantWritten::Purged(id))
    })
    .await
}

/// The ids of up to `limit` tenants whose `expire_time` is before `now`.
pub async fn expired(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> diesel::QueryResult<Vec<Uuid>> {
    tenants::table
        .filter(tenants::expire_time.lt(now))
        .select(tenants::id)
        .limit(limit)
        .load(conn)
        .await
}
