//! Reading users: one by id, an export's chunks, and GetUser's shared lookup.

use std::collections::HashMap;

use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, SelectableHelper};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use futures_util::future::try_join_all;
use uuid::Uuid;

use super::{Condition, in_scope, list::filtered};
use crate::store::coalesce::Batch;
use crate::store::error::StoreError;
use crate::store::models::UserRow;
use crate::store::schema::users;

/// The user with this id in the scope, deleted or not.
pub async fn find(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
) -> diesel::QueryResult<Option<UserRow>> {
    users::table
        .filter(users::id.eq(id))
        .filter(in_scope(tenant))
        .select(UserRow::as_select())
        .first(conn)
        .await
        .optional()
}

/// Whether the user with this id, in any tenant, may act: active and not
/// deleted; `None` when there is no such user.
pub async fn active_flag(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> diesel::QueryResult<Option<bool>> {
    users::table
        .filter(users::id.eq(id))
        .select((users::active, users::delete_time.is_null()))
        .first::<(bool, bool)>(conn)
        .await
        .optional()
        .map(|found| found.map(|(active, live)| active && live))
}

/// The next `limit` users matching `conditions` after id `after`, in id order.
pub async fn export_chunk(
    conn: &mut AsyncPgConnection,
    conditions: &[Condition],
    after: Option<Uuid>,
    limit: i64,
) -> diesel::QueryResult<Vec<UserRow>> {
    let mut query = filtered(conditions);
    if let Some(after) = after {
        query = query.filter(users::id.gt(after));
    }
    query
        .order_by(users::id.asc())
        .select(UserRow::as_select())
        .limit(limit)
        .load(conn)
        .await
}

/// GetUser for the calls of one batch: one lookup by id for all of them,
/// each result seen through its own caller's scope `(id, tenant)`. Deleted
/// users are not found.
#[derive(Debug)]
pub struct FindUsers;

/// Batches of at most this many calls look each user up on its own (see
/// [`FindUsers::run`]); larger ones with one `id = ANY($1)`, whose planning
/// then costs less than that many lookups.
const PIPELINED: usize = 8;

impl Batch for FindUsers {
    type Item = (Uuid, Option<Uuid>);
    type Output = Option<UserRow>;
    const MAX: usize = 128;
    /// A lookup by primary key takes well under a millisecond.
    const POOL_SHARE: usize = 4;
    const NAME: &'static str = "get_user";
    const STATEMENT: (&'static str, Option<&'static str>) = ("SELECT", Some("users"));

    async fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<Self::Item>,
    ) -> Result<Vec<Result<Option<UserRow>, StoreError>>, StoreError> {
        let live = users::table.filter(users::delete_time.is_null());
        let found: Vec<UserRow> = if items.len() <= PIPELINED {
            // Each call its own `id = $1`, all sent at once on the
            // connection (pipelined): one round trip, and a statement
            // Postgres plans once, for any id. `id = ANY($1)` it plans
            // again at every call (a generic plan for an array of unknown
            // length looks dearer than a plan for the array at hand),
            // which costs more than a few lookups on a table of many
            // indexes.
            let shared: &AsyncPgConnection = conn;
            let lookups = items.iter().map(|(id, _)| {
                live.filter(users::id.eq(*id))
                    .select(UserRow::as_select())
                    .load::<UserRow>(&mut &*shared)
            });
            try_join_all(lookups).await?.into_iter().flatten().collect()
        } else {
            let ids: Vec<Uuid> = items.iter().map(|(id, _)| *id).collect();
            live.filter(users::id.eq_any(ids))
                .select(UserRow::as_select())
                .load(conn)
                .await?
        };
        let rows: HashMap<Uuid, UserRow> = found.into_iter().map(|row| (row.id, row)).collect();
        Ok(items
            .iter()
            .map(|(id, tenant)| {
                Ok(rows
                    .get(id)
                    .filter(|row| tenant.is_none_or(|t| row.tenant_id == t))
                    .cloned())
            })
            .collect())
    }
}
