//! Queries on `users`: small async functions that return `QueryResult`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::{
    BoolExpressionMethods, ExpressionMethods, OptionalExtension, PgJsonbExpressionMethods,
    PgTextExpressionMethods, QueryDsl, SelectableHelper, pg::Pg,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use crate::error::Error;

use super::coalesce::Batch;
use super::failure::is_outage;
use super::filter::{
    Boxed, CursorValue, Direction, TextOp, TimeOp, UuidOp, escape_like, text_condition,
    time_condition, uuid_condition,
};
use super::models::{NewUser, UserChanges, UserRow};
use super::schema::users;

/// A text column of `users` that lists can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextField {
    Reference,
    Email,
    Phone,
    FirstName,
    LastName,
    Locale,
    Timezone,
}

/// A UUID column of `users` that lists can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidField {
    Id,
    TenantId,
}

/// A boolean column of `users` that lists can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoolField {
    Active,
    IsOptedIn,
}

/// A timestamp column of `users` that lists can filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeField {
    CreatedAt,
    UpdatedAt,
}

/// One condition of a user list; a list ANDs all of its conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Text(TextField, TextOp),
    Uuid(UuidField, UuidOp),
    /// The column equals the value.
    Bool(BoolField, bool),
    Time(TimeField, TimeOp),
    /// `custom_data @> value`.
    CustomDataContains(serde_json::Value),
    /// Case-insensitive substring of email, first name or last name.
    Search(String),
}

/// A column users can be ordered by. `Id` is the final tie-breaker of every order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderField {
    CreatedAt,
    UpdatedAt,
    Email,
    FirstName,
    LastName,
    Locale,
    Phone,
    Timezone,
    Reference,
    Active,
    Id,
}

/// What a page of users is made of.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ListQuery {
    pub conditions: Vec<Condition>,
    /// Ordering terms, most significant first, not including the `Id` tie-breaker.
    pub order: Vec<(OrderField, Direction)>,
    /// Keyset cursor: the sort key of the last row already seen, one value per
    /// term of [`ListQuery::terms`].
    pub after: Option<Vec<CursorValue>>,
    pub limit: i64,
    pub offset: i64,
    pub count_total: bool,
    /// With `count_total`: count at most this many matches plus one, so
    /// that a total above the limit tells that the count stopped there.
    pub count_limit: Option<i64>,
}

/// A page of rows, the number of matches, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq)]
pub struct Page<T> {
    pub rows: Vec<T>,
    pub total: Option<i64>,
    /// Present when more rows follow this page.
    pub next: Option<Vec<CursorValue>>,
}

/// A keyset cursor that does not fit the order it is used with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("page token does not match this request")]
pub struct CursorMismatch;

impl ListQuery {
    /// The ordering terms including the `Id` tie-breaker.
    pub fn terms(&self) -> Vec<(OrderField, Direction)> {
        let mut terms = self.order.clone();
        terms.push((OrderField::Id, Direction::Asc));
        terms
    }
}

pub async fn insert(conn: &mut AsyncPgConnection, user: &NewUser) -> diesel::QueryResult<UserRow> {
    diesel::insert_into(users::table)
        .values(user)
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
}

/// The users a call may reach: all, or those of one tenant. A user outside
/// the scope is treated as if it did not exist.
fn in_scope(tenant: Option<Uuid>) -> Boxed<users::table> {
    match tenant {
        Some(tenant) => Box::new(users::tenant_id.eq(tenant)),
        // Always true: the column is NOT NULL.
        None => Box::new(users::tenant_id.is_not_null()),
    }
}

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

/// The active flag of the user with this id, in any tenant; `None` when
/// there is none.
pub async fn active_flag(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> diesel::QueryResult<Option<bool>> {
    users::table
        .filter(users::id.eq(id))
        .select(users::active)
        .first(conn)
        .await
        .optional()
}

/// Applies `changes`; `None` when no user in scope has this id.
pub async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    changes: &UserChanges,
) -> diesel::QueryResult<Option<UserRow>> {
    diesel::update(users::table)
        .filter(users::id.eq(id))
        .filter(in_scope(tenant))
        .set(changes)
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
        .optional()
}

/// Sets the active flag. A user already in that state is returned unchanged
/// (its `updated_at` stays), which makes (de)activation idempotent.
pub async fn set_active(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    active: bool,
    now: DateTime<Utc>,
) -> diesel::QueryResult<Option<UserRow>> {
    let changed = diesel::update(users::table)
        .filter(users::id.eq(id))
        .filter(in_scope(tenant))
        .filter(users::active.ne(active))
        .set((users::active.eq(active), users::updated_at.eq(now)))
        .returning(UserRow::as_returning())
        .get_result(conn)
        .await
        .optional()?;
    match changed {
        Some(row) => Ok(Some(row)),
        None => find(conn, id, tenant).await,
    }
}

/// One page of users, with the total count when asked for.
///
/// Fails with [`CursorMismatch`] (inside `Ok`) when `query.after` does not fit
/// the order, which callers report as a bad page token.
pub async fn list(
    conn: &mut AsyncPgConnection,
    query: &ListQuery,
) -> diesel::QueryResult<Result<Page<UserRow>, CursorMismatch>> {
    let terms = query.terms();
    let after = match &query.after {
        Some(values) => match keyset_condition(&terms, values) {
            Some(condition) => Some(condition),
            None => return Ok(Err(CursorMismatch)),
        },
        None => None,
    };

    let total = match (query.count_total, query.count_limit) {
        (false, _) => None,
        (true, None) => Some(
            filtered(&query.conditions)
                .count()
                .get_result::<i64>(conn)
                .await?,
        ),
        // The first limit + 1 matches, counted: as many rows at most.
        (true, Some(limit)) => Some(
            CountRows(
                filtered(&query.conditions)
                    .select(users::id)
                    .limit(limit + 1),
            )
            .get_result::<i64>(conn)
            .await?,
        ),
    };

    let mut rows_query = filtered(&query.conditions);
    if let Some(after) = after {
        rows_query = rows_query.filter(after);
    }
    let rows_query = rows_query.order(OrderBy(terms.clone()));
    // One row more than asked tells whether another page follows.
    let mut rows = rows_query
        .select(UserRow::as_select())
        .limit(query.limit + 1)
        .offset(query.offset)
        .load::<UserRow>(conn)
        .await?;
    let next = if rows.len() as i64 > query.limit {
        rows.truncate(query.limit as usize);
        rows.last().map(|row| cursor_of(row, &terms))
    } else {
        None
    };
    Ok(Ok(Page { rows, total, next }))
}

/// `SELECT count(*) FROM (query) AS matches`: counts the rows of a query
/// that has a LIMIT, which `query.count()` cannot (it would drop the limit)
/// and `id IN (query)` does badly (Postgres joins the whole table to it).
#[derive(Debug, Clone, diesel::query_builder::QueryId)]
struct CountRows<Q>(Q);

impl<Q> diesel::query_builder::Query for CountRows<Q> {
    type SqlType = diesel::sql_types::BigInt;
}

impl<Q: diesel::query_builder::QueryFragment<Pg>> diesel::query_builder::QueryFragment<Pg>
    for CountRows<Q>
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        out.push_sql("SELECT count(*) FROM (");
        self.0.walk_ast(out.reborrow())?;
        out.push_sql(") AS matches");
        Ok(())
    }
}

/// The rows matching every condition, unordered.
fn filtered(conditions: &[Condition]) -> users::BoxedQuery<'static, Pg> {
    let mut query = users::table.into_boxed();
    for condition in conditions {
        query = query.filter(condition_expression(condition));
    }
    query
}

fn condition_expression(condition: &Condition) -> Boxed<users::table> {
    match condition {
        Condition::Text(field, op) => match field {
            TextField::Reference => text_condition!(users::reference, op),
            TextField::Email => text_condition!(users::email, op),
            TextField::Phone => text_condition!(users::phone, op),
            TextField::FirstName => text_condition!(users::first_name, op),
            TextField::LastName => text_condition!(users::last_name, op),
            TextField::Locale => text_condition!(users::locale, op),
            TextField::Timezone => text_condition!(users::timezone, op),
        },
        Condition::Uuid(field, op) => match field {
            UuidField::Id => uuid_condition!(users::id, op),
            UuidField::TenantId => uuid_condition!(users::tenant_id, op),
        },
        Condition::Bool(field, value) => match field {
            BoolField::Active => Box::new(users::active.eq(*value)),
            BoolField::IsOptedIn => Box::new(users::is_opted_in.eq(*value)),
        },
        Condition::Time(field, op) => match field {
            TimeField::CreatedAt => time_condition!(users::created_at, *op),
            TimeField::UpdatedAt => time_condition!(users::updated_at, *op),
        },
        Condition::CustomDataContains(value) => {
            Box::new(users::custom_data.contains(value.clone()))
        }
        Condition::Search(text) => {
            let pattern = format!("%{}%", escape_like(text));
            Box::new(
                users::email
                    .ilike(pattern.clone())
                    .or(users::first_name.ilike(pattern.clone()))
                    .or(users::last_name.ilike(pattern)),
            )
        }
    }
}

/// The `ORDER BY` list of a user list, written out term by term.
///
/// diesel's `then_order_by` nests one more tuple per term, and walking a
/// nested tuple walks each level twice (once to ask whether it is empty), so
/// its cost doubles with every term. This walks the terms once.
#[derive(Debug, Clone)]
struct OrderBy(Vec<(OrderField, Direction)>);

impl diesel::Expression for OrderBy {
    type SqlType = diesel::expression::expression_types::NotSelectable;
}

impl diesel::AppearsOnTable<users::table> for OrderBy {}

impl diesel::query_builder::QueryFragment<Pg> for OrderBy {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        for (i, (field, direction)) in self.0.iter().enumerate() {
            if i > 0 {
                out.push_sql(", ");
            }
            out.push_identifier("users")?;
            out.push_sql(".");
            out.push_identifier(field.column())?;
            out.push_sql(match direction {
                Direction::Asc => " ASC",
                Direction::Desc => " DESC",
            });
        }
        Ok(())
    }
}

impl OrderField {
    /// The column of `users` this field orders by.
    fn column(self) -> &'static str {
        match self {
            Self::CreatedAt => "created_at",
            Self::UpdatedAt => "updated_at",
            Self::Email => "email",
            Self::FirstName => "first_name",
            Self::LastName => "last_name",
            Self::Locale => "locale",
            Self::Phone => "phone",
            Self::Timezone => "timezone",
            Self::Reference => "reference",
            Self::Active => "active",
            Self::Id => "id",
        }
    }
}

/// The sort key of `row` under `terms`, as a cursor.
fn cursor_of(row: &UserRow, terms: &[(OrderField, Direction)]) -> Vec<CursorValue> {
    terms
        .iter()
        .map(|(field, _)| match field {
            OrderField::CreatedAt => CursorValue::time(row.created_at),
            OrderField::UpdatedAt => CursorValue::time(row.updated_at),
            OrderField::Email => CursorValue::Text(row.email.clone()),
            OrderField::FirstName => CursorValue::Text(row.first_name.clone()),
            OrderField::LastName => CursorValue::Text(row.last_name.clone()),
            OrderField::Locale => CursorValue::Text(row.locale.clone()),
            OrderField::Phone => CursorValue::Text(row.phone.clone()),
            OrderField::Timezone => CursorValue::Text(row.timezone.clone()),
            OrderField::Reference => CursorValue::Text(row.reference.clone()),
            OrderField::Active => CursorValue::Bool(row.active),
            OrderField::Id => CursorValue::Text(row.id.to_string()),
        })
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Cmp {
    Eq,
    Before,
    After,
    AtOrAfter,
}

/// Rows strictly after the cursor in the order of `terms`:
/// `k1 > v1 OR (k1 = v1 AND k2 > v2) OR ...` (with `<` for descending terms),
/// plus the redundant `k1 >= v1`, which lets Postgres start the index scan at
/// the cursor instead of filtering every earlier row.
fn keyset_condition(
    terms: &[(OrderField, Direction)],
    values: &[CursorValue],
) -> Option<Boxed<users::table>> {
    if terms.len() != values.len() {
        return None;
    }
    let mut any: Option<Boxed<users::table>> = None;
    for i in 0..terms.len() {
        let (field, direction) = terms[i];
        let past = match direction {
            Direction::Asc => Cmp::After,
            Direction::Desc => Cmp::Before,
        };
        let mut all = compare(field, past, &values[i])?;
        for j in 0..i {
            all = Box::new(diesel::BoolExpressionMethods::and(
                compare(terms[j].0, Cmp::Eq, &values[j])?,
                all,
            ));
        }
        any = Some(match any {
            None => all,
            Some(any) => Box::new(diesel::BoolExpressionMethods::or(any, all)),
        });
    }
    let (first, direction) = terms[0];
    let bound = match direction {
        Direction::Asc => compare(first, Cmp::AtOrAfter, &values[0])?,
        Direction::Desc => {
            // `k1 <= v1` for descending order.
            let before = compare(first, Cmp::Before, &values[0])?;
            let equal = compare(first, Cmp::Eq, &values[0])?;
            Box::new(diesel::BoolExpressionMethods::or(before, equal))
        }
    };
    Some(Box::new(diesel::BoolExpressionMethods::and(bound, any?)))
}

/// `field <cmp> value`, or `None` when the value has the wrong type for the field.
fn compare(field: OrderField, cmp: Cmp, value: &CursorValue) -> Option<Boxed<users::table>> {
    macro_rules! compare {
        ($column:expr, $value:expr) => {{
            let value = $value;
            let expression: Boxed<users::table> = match cmp {
                Cmp::Eq => Box::new($column.eq(value)),
                Cmp::Before => Box::new($column.lt(value)),
                Cmp::After => Box::new($column.gt(value)),
                Cmp::AtOrAfter => Box::new($column.ge(value)),
            };
            Some(expression)
        }};
    }
    match (field, value) {
        (OrderField::CreatedAt, CursorValue::Micros(m)) => {
            compare!(
                users::created_at,
                DateTime::<Utc>::from_timestamp_micros(*m)?
            )
        }
        (OrderField::UpdatedAt, CursorValue::Micros(m)) => {
            compare!(
                users::updated_at,
                DateTime::<Utc>::from_timestamp_micros(*m)?
            )
        }
        (OrderField::Email, CursorValue::Text(s)) => compare!(users::email, s.clone()),
        (OrderField::FirstName, CursorValue::Text(s)) => compare!(users::first_name, s.clone()),
        (OrderField::LastName, CursorValue::Text(s)) => compare!(users::last_name, s.clone()),
        (OrderField::Locale, CursorValue::Text(s)) => compare!(users::locale, s.clone()),
        (OrderField::Phone, CursorValue::Text(s)) => compare!(users::phone, s.clone()),
        (OrderField::Timezone, CursorValue::Text(s)) => compare!(users::timezone, s.clone()),
        (OrderField::Reference, CursorValue::Text(s)) => compare!(users::reference, s.clone()),
        (OrderField::Active, CursorValue::Bool(b)) => compare!(users::active, *b),
        (OrderField::Id, CursorValue::Text(s)) => compare!(users::id, Uuid::parse_str(s).ok()?),
        _ => None,
    }
}

/// Creates or updates every row, matched on (tenant_id, reference), in one
/// statement. A row that matches gets every column of `rows` but its id and
/// creation time. Any unique violation (an email taken) fails it as a whole.
pub async fn upsert_all(
    conn: &mut AsyncPgConnection,
    rows: &[NewUser],
) -> diesel::QueryResult<Vec<UserRow>> {
    use diesel::upsert::{DecoratableTarget, excluded};
    diesel::insert_into(users::table)
        .values(rows)
        .on_conflict((users::tenant_id, users::reference))
        // The partial unique index covers non-empty references only.
        .filter_target(users::reference.ne(""))
        .do_update()
        .set((
            users::email.eq(excluded(users::email)),
            users::phone.eq(excluded(users::phone)),
            users::first_name.eq(excluded(users::first_name)),
            users::last_name.eq(excluded(users::last_name)),
            users::locale.eq(excluded(users::locale)),
            users::timezone.eq(excluded(users::timezone)),
            users::is_opted_in.eq(excluded(users::is_opted_in)),
            users::active.eq(excluded(users::active)),
            users::custom_data.eq(excluded(users::custom_data)),
            users::avatar_url.eq(excluded(users::avatar_url)),
            users::updated_at.eq(excluded(users::updated_at)),
        ))
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
}

/// Upserts a batch in one transaction, with one outcome per row, in order.
///
/// The whole batch goes in one statement; only when that fails for a reason
/// other than an outage (a unique violation, a value Postgres refuses) does
/// it fall back to one savepoint per row, so that the rows that can be
/// stored are, and each other row reports its own error.
pub async fn upsert_batch(
    conn: &mut AsyncPgConnection,
    rows: &[NewUser],
) -> diesel::QueryResult<Vec<Result<UserRow, diesel::result::Error>>> {
    use diesel::result::Error;
    use diesel_async::AsyncConnection;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    conn.transaction(async |conn| {
        let together = conn
            .transaction(async |conn| upsert_all(conn, rows).await)
            .await;
        match together {
            Ok(stored) => {
                // RETURNING order is not guaranteed: match rows by their key.
                let mut by_key: std::collections::HashMap<(Uuid, String), UserRow> = stored
                    .into_iter()
                    .map(|row| ((row.tenant_id, row.reference.clone()), row))
                    .collect();
                Ok(rows
                    .iter()
                    .map(|row| {
                        by_key
                            .remove(&(row.tenant_id, row.reference.clone()))
                            .ok_or(Error::NotFound)
                    })
                    .collect())
            }
            Err(e) if is_outage(&e) => Err(e),
            Err(_) => {
                let mut outcomes = Vec::with_capacity(rows.len());
                for row in rows {
                    let one = conn
                        .transaction(async |conn| upsert_all(conn, std::slice::from_ref(row)).await)
                        .await;
                    outcomes.push(match one {
                        Ok(mut stored) => stored.pop().ok_or(Error::NotFound),
                        Err(e) if is_outage(&e) => return Err(e),
                        Err(e) => Err(e),
                    });
                }
                Ok(outcomes)
            }
        }
    })
    .await
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

/// Inserts `rows` in one statement and returns those stored. A row that
/// clashes with a stored one, or with an earlier row of `rows`, on a unique
/// key is skipped; any other failure fails all of them.
pub async fn insert_all(
    conn: &mut AsyncPgConnection,
    rows: &[NewUser],
) -> diesel::QueryResult<Vec<UserRow>> {
    diesel::insert_into(users::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
}

/// GetUser for the calls of one batch: one lookup by id for all of them,
/// each result seen through its own caller's scope `(id, tenant)`.
#[derive(Debug)]
pub struct FindUsers;

impl Batch for FindUsers {
    type Item = (Uuid, Option<Uuid>);
    type Output = Option<UserRow>;
    const MAX: usize = 128;
    /// A lookup by primary key takes well under a millisecond.
    const POOL_SHARE: usize = 4;
    const NAME: &'static str = "get_user";

    async fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<Self::Item>,
    ) -> Result<Vec<Result<Option<UserRow>, Error>>, Error> {
        let ids: Vec<Uuid> = items.iter().map(|(id, _)| *id).collect();
        let rows: HashMap<Uuid, UserRow> = users::table
            .filter(users::id.eq_any(ids))
            .select(UserRow::as_select())
            .load(conn)
            .await?
            .into_iter()
            .map(|row| (row.id, row))
            .collect();
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

/// CreateUser for the calls of one batch: one multi-row insert, one commit.
/// A row that clashes on a unique key, and every row when the statement
/// fails as a whole (a tenant that does not exist, say), is then inserted on
/// its own, so that each call gets its own outcome and error.
#[derive(Debug)]
pub struct InsertUsers;

impl Batch for InsertUsers {
    type Item = NewUser;
    type Output = UserRow;
    const MAX: usize = 64;
    /// A commit waits for its WAL flush: two at once overlap them.
    const POOL_SHARE: usize = 2;
    const NAME: &'static str = "create_user";

    async fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<NewUser>,
    ) -> Result<Vec<Result<UserRow, Error>>, Error> {
        let mut stored = HashMap::new();
        // A lone row goes straight to the plain insert below: one round trip,
        // its own error included.
        if items.len() > 1 {
            match insert_all(conn, &items).await.map_err(Error::from) {
                Ok(rows) => stored.extend(rows.into_iter().map(|row| (row.id, row))),
                Err(error @ Error::Unavailable(_)) => return Err(error),
                // Nothing was stored: each row on its own tells what is wrong.
                Err(_) => {}
            }
        }
        let mut results = Vec::with_capacity(items.len());
        for item in &items {
            results.push(match stored.remove(&item.id) {
                Some(row) => Ok(row),
                None => insert(conn, item).await.map_err(Error::from),
            });
        }
        Ok(results)
    }
}
