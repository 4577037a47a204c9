//! The outcomes of idempotent requests (AIP-155), in `request_ids`.
//!
//! A mutating request that carries a request id stores its response here in
//! the transaction of its write, so the record exists exactly when the
//! write committed. A retry finds it and gets the same response; a retry
//! that races the first one blocks on the first's uncommitted record (the
//! primary key), then finds it.

use chrono::{DateTime, Utc};
use diesel::{ExpressionMethods, OptionalExtension, PgArrayExpressionMethods, QueryDsl};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::schema::request_ids;

/// The record of one successful request.
#[derive(Debug, Clone, PartialEq, diesel::Insertable)]
#[diesel(table_name = request_ids)]
pub struct NewRecord {
    pub caller: String,
    pub request_id: Uuid,
    pub method: String,
    pub fingerprint: Option<Vec<u8>>,
    pub response: Option<Vec<u8>>,
    pub tenant_id: Option<Uuid>,
    pub user_ids: Vec<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// `WITH recorded AS (<records>) <statement>`: a write and the records of
/// the requests that asked for it as one statement, so one round trip and
/// one commit, and all of it or nothing.
#[derive(Debug, Clone, diesel::query_builder::QueryId)]
pub struct WithRecords<R, S> {
    pub records: R,
    pub statement: S,
}

impl<R, S: diesel::query_builder::Query> diesel::query_builder::Query for WithRecords<R, S> {
    type SqlType = S::SqlType;
}

impl<R, S> diesel::query_builder::QueryFragment<diesel::pg::Pg> for WithRecords<R, S>
where
    R: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
    S: diesel::query_builder::QueryFragment<diesel::pg::Pg>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> diesel::QueryResult<()> {
        out.push_sql("WITH recorded AS (");
        self.records.walk_ast(out.reborrow())?;
        out.push_sql(") ");
        self.statement.walk_ast(out.reborrow())
    }
}

/// A stored record, as a retry reads it.
#[derive(Debug, Clone, PartialEq, diesel::Queryable, diesel::Selectable)]
#[diesel(table_name = request_ids, check_for_backend(diesel::pg::Pg))]
pub struct Record {
    pub method: String,
    /// `None` once erased.
    pub fingerprint: Option<Vec<u8>>,
    /// `None` once erased.
    pub response: Option<Vec<u8>>,
    pub created_at: DateTime<Utc>,
}

/// The name of the primary key: a violation means that the request id is
/// taken (by a first request that committed while this one ran).
pub const TAKEN: &str = "request_ids_pkey";

pub async fn insert(conn: &mut AsyncPgConnection, record: &NewRecord) -> diesel::QueryResult<()> {
    diesel::insert_into(request_ids::table)
        .values(record)
        .execute(conn)
        .await
        .map(drop)
}

pub async fn find(
    conn: &mut AsyncPgConnection,
    caller: &str,
    request_id: Uuid,
) -> diesel::QueryResult<Option<Record>> {
    request_ids::table
        .filter(request_ids::caller.eq(caller))
        .filter(request_ids::request_id.eq(request_id))
        .select(<Record as diesel::SelectableHelper<diesel::pg::Pg>>::as_select())
        .first(conn)
        .await
        .optional()
}

/// Forgets one record made before `before` (expired), so the id can run again.
pub async fn forget(
    conn: &mut AsyncPgConnection,
    caller: &str,
    request_id: Uuid,
    before: DateTime<Utc>,
) -> diesel::QueryResult<()> {
    diesel::delete(
        request_ids::table
            .filter(request_ids::caller.eq(caller))
            .filter(request_ids::request_id.eq(request_id))
            .filter(request_ids::created_at.lt(before)),
    )
    .execute(conn)
    .await
    .map(drop)
}

/// Forgets up to `limit` records made before `before`, in one statement;
/// how many.
pub async fn forget_expired(
    conn: &mut AsyncPgConnection,
    before: DateTime<Utc>,
    limit: i64,
) -> diesel::QueryResult<usize> {
    use diesel::sql_types::{BigInt, Timestamptz};
    diesel::sql_query(
        "DELETE FROM request_ids WHERE ctid = ANY (ARRAY( \
         SELECT ctid FROM request_ids WHERE created_at < $1 LIMIT $2))",
    )
    .bind::<Timestamptz, _>(before)
    .bind::<BigInt, _>(limit)
    .execute(conn)
    .await
}

/// Erases what the records about these users hold: their responses and
/// fingerprints (which hash the personal data the requests carried). The
/// records stay, empty, so that a retry answers NOT_FOUND instead of
/// running again and bringing the person back.
pub async fn erase_users(conn: &mut AsyncPgConnection, users: &[Uuid]) -> diesel::QueryResult<()> {
    diesel::update(request_ids::table.filter(request_ids::user_ids.overlaps_with(users)))
        .set((
            request_ids::fingerprint.eq(None::<Vec<u8>>),
            request_ids::response.eq(None::<Vec<u8>>),
            request_ids::user_ids.eq(Vec::<Uuid>::new()),
        ))
        .execute(conn)
        .await
        .map(drop)
}

/// Erases the records about a tenant, as [`erase_users`] does.
pub async fn erase_tenant(conn: &mut AsyncPgConnection, tenant: Uuid) -> diesel::QueryResult<()> {
    diesel::update(request_ids::table.filter(request_ids::tenant_id.eq(tenant)))
        .set((
            request_ids::fingerprint.eq(None::<Vec<u8>>),
            request_ids::response.eq(None::<Vec<u8>>),
            request_ids::user_ids.eq(Vec::<Uuid>::new()),
            request_ids::tenant_id.eq(None::<Uuid>),
        ))
        .execute(conn)
        .await
        .map(drop)
}
