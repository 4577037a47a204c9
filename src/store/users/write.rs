//! The one path of every change to users.
//!
//! CreateUser (through its coalescer, [`InsertUsers`]), UpdateUser,
//! DeactivateUser, ReactivateUser and BatchUpsertUsers (and `import`, which
//! calls it) all reach the database through [`apply`]. A rule that every
//! change must follow (write an event row, check and bump an etag) is
//! written here, once.
//!
//! # One policy for several rows
//!
//! A write of one row is one statement. Several rows go first as one
//! multi-row statement; when that fails for a reason of its rows rather
//! than an outage (a unique key taken, a tenant that does not exist), or
//! leaves some rows out (a clash with a stored row), each row that is not
//! settled goes again on its own and gets its own outcome. The rows of one
//! call ([`Commit::Together`]: BatchUpsertUsers) commit together, in one
//! transaction, each row that goes on its own on a savepoint of its own;
//! the rows of different calls ([`Commit::Apart`]: coalesced CreateUser
//! calls) commit on their own. An outage fails all of them.
//!
//! # A caller that goes away
//!
//! A statement runs as long as a caller waits for its result. Once none
//! does (each gave up or ran out of time), it is cancelled in Postgres and
//! its connection closed (`db::run`, and the coalescer for a shared
//! statement), so nothing of a write that had not committed remains. A
//! write that committed first, or that shares its statement with a caller
//! still waiting, stays. Either way a caller that went away learns nothing
//! of it: for that caller DEADLINE_EXCEEDED, CANCELLED and UNAVAILABLE mean
//! "outcome unknown".

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use diesel::{
    AsChangeset, ExpressionMethods, Insertable, OptionalExtension, QueryDsl, SelectableHelper,
    sql_types::Timestamptz,
};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::in_scope;
use crate::domain::{AvatarUrl, CustomData, Email, Locale, Phone, ShortText, TimeZone};
use crate::store::coalesce::Batch;
use crate::store::db;
use crate::store::error::StoreError;
use crate::store::models::{NewUser, UserChanges, UserRow};
use crate::store::schema::users;

/// Runs `$work` on `$conn`, on a savepoint when `$savepoint`, so that its
/// failure leaves the surrounding transaction usable; a `StoreError` on
/// failure. (A macro: a generic function would have to promise that any
/// closure's future is `Send`, which the transaction API requires.)
macro_rules! guarded {
    ($conn:expr, $savepoint:expr, |$c:ident| $work:expr) => {{
        let result = if $savepoint {
            $conn.transaction(async |$c| $work.await).await
        } else {
            let $c = &mut *$conn;
            $work.await
        };
        result.map_err(StoreError::from)
    }};
}

/// One change to one user.
#[derive(Debug, Clone)]
pub enum Write {
    /// A new user; its reference and email must be free in its tenant.
    Create(NewUser),
    /// A new user or, when its tenant has a user with its reference, that
    /// user with every field of this one but its id and creation time.
    Upsert(NewUser),
    /// The fields `changes` sets, on the user with this id if the scope
    /// (one tenant, or all) has it.
    Update {
        id: Uuid,
        tenant: Option<Uuid>,
        changes: UserChanges,
    },
    /// The active flag of the user with this id; a user already in that
    /// state stays as it is, `updated_at` included.
    SetActive {
        id: Uuid,
        tenant: Option<Uuid>,
        active: bool,
        at: DateTime<Utc>,
    },
}

/// What one write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    Created(UserRow),
    Updated(UserRow),
    /// The user already was as asked: nothing was written.
    Unchanged(UserRow),
    /// No user in the write's scope has its id.
    Missing,
}

impl Written {
    /// The user after the write, if there is one.
    pub fn into_row(self) -> Option<UserRow> {
        match self {
            Self::Created(row) | Self::Updated(row) | Self::Unchanged(row) => Some(row),
            Self::Missing => None,
        }
    }
}

/// Whether the rows of one [`apply`] commit together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// All of them, in one transaction: the rows of one call.
    Together,
    /// Each on its own: the rows of different calls.
    Apart,
}

/// A [`NewUser`] as `users` stores it: text that is not set is empty.
#[derive(Insertable)]
#[diesel(table_name = users)]
struct UserInsert<'a> {
    tenant_id: Uuid,
    id: Uuid,
    reference: &'a str,
    email: &'a str,
    phone: &'a str,
    first_name: &'a str,
    last_name: &'a str,
    locale: &'a str,
    timezone: &'a str,
    is_opted_in: bool,
    active: bool,
    custom_data: &'a serde_json::Value,
    avatar_url: &'a str,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl<'a> From<&'a NewUser> for UserInsert<'a> {
    fn from(user: &'a NewUser) -> Self {
        Self {
            tenant_id: user.tenant_id,
            id: user.id,
            reference: user.reference.as_str(),
            email: user.email.as_ref().map_or("", Email::as_str),
            phone: user.phone.as_ref().map_or("", Phone::as_str),
            first_name: user.first_name.as_str(),
            last_name: user.last_name.as_str(),
            locale: user.locale.as_str(),
            timezone: user.timezone.as_ref().map_or("", TimeZone::as_str),
            is_opted_in: user.is_opted_in,
            active: user.active,
            custom_data: user.custom_data.as_value(),
            avatar_url: user.avatar_url.as_ref().map_or("", AvatarUrl::as_str),
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}

/// [`UserChanges`] as `users` stores them: `None` leaves a column alone.
#[derive(AsChangeset)]
#[diesel(table_name = users)]
struct UserChangeset<'a> {
    email: Option<&'a str>,
    phone: Option<&'a str>,
    first_name: Option<&'a str>,
    last_name: Option<&'a str>,
    locale: Option<&'a str>,
    timezone: Option<&'a str>,
    is_opted_in: Option<bool>,
    active: Option<bool>,
    custom_data: Option<&'a serde_json::Value>,
    avatar_url: Option<&'a str>,
}

impl<'a> From<&'a UserChanges> for UserChangeset<'a> {
    fn from(changes: &'a UserChanges) -> Self {
        /// A field that may be unset: cleared is the empty string.
        fn text<T>(value: &Option<Option<T>>, as_str: fn(&T) -> &str) -> Option<&str> {
            value
                .as_ref()
                .map(|value| value.as_ref().map_or("", as_str))
        }
        Self {
            email: text(&changes.email, Email::as_str),
            phone: text(&changes.phone, Phone::as_str),
            first_name: changes.first_name.as_ref().map(ShortText::as_str),
            last_name: changes.last_name.as_ref().map(ShortText::as_str),
            locale: changes.locale.as_ref().map(Locale::as_str),
            timezone: text(&changes.timezone, |zone| zone.as_str()),
            is_opted_in: changes.is_opted_in,
            active: changes.active,
            custom_data: changes.custom_data.as_ref().map(CustomData::as_value),
            avatar_url: text(&changes.avatar_url, AvatarUrl::as_str),
        }
    }
}

/// The outcome of each write, in order; `Err` for the whole when an outage
/// stopped them.
pub type Outcomes = Vec<Result<Written, StoreError>>;

/// Applies `writes`, with one outcome each, by the policy of this module.
pub async fn apply(
    conn: &mut AsyncPgConnection,
    writes: &[Write],
    commit: Commit,
) -> Result<Outcomes, StoreError> {
    match (writes, commit) {
        ([], _) => Ok(Vec::new()),
        ([write], _) => Ok(vec![settled(one(conn, write).await)?]),
        (_, Commit::Apart) => several(conn, writes, false).await,
        (_, Commit::Together) => {
            conn.transaction(async |conn| several(conn, writes, true).await)
                .await
        }
    }
}

/// Applies one write: its outcome, or `Err` for an outage.
pub async fn apply_one(
    conn: &mut AsyncPgConnection,
    write: &Write,
) -> Result<Result<Written, StoreError>, StoreError> {
    settled(one(conn, write).await)
}

/// An outage fails the whole; any other failure is the row's own outcome.
fn settled(
    result: diesel::QueryResult<Written>,
) -> Result<Result<Written, StoreError>, StoreError> {
    match result.map_err(StoreError::from) {
        Err(error) if error.is_outage() => Err(error),
        result => Ok(result),
    }
}

/// Several writes: the multi-row statement when they are all of one kind
/// that has one, then each write it did not settle on its own (on a
/// savepoint of its own when `savepoints`).
async fn several(
    conn: &mut AsyncPgConnection,
    writes: &[Write],
    savepoints: bool,
) -> Result<Outcomes, StoreError> {
    let mut outcomes: Vec<Option<Result<Written, StoreError>>> = vec![None; writes.len()];
    let together = match multi_row(writes) {
        Some(MultiRow::Create(rows)) => guarded!(conn, savepoints, |conn| insert_all(conn, &rows))
            .map(|stored| {
                let mut by_id: HashMap<Uuid, UserRow> =
                    stored.into_iter().map(|row| (row.id, row)).collect();
                for (outcome, row) in outcomes.iter_mut().zip(&rows) {
                    *outcome = by_id.remove(&row.id).map(|row| Ok(Written::Created(row)));
                }
            }),
        Some(MultiRow::Upsert(rows)) => {
            guarded!(conn, savepoints, |conn| upsert_all(conn, &rows)).map(|stored| {
                // RETURNING order is not guaranteed: match rows by their key.
                let mut by_key: HashMap<(Uuid, String), UserRow> = stored
                    .into_iter()
                    .map(|row| ((row.tenant_id, row.reference.clone()), row))
                    .collect();
                for (outcome, row) in outcomes.iter_mut().zip(&rows) {
                    *outcome = by_key
                        .remove(&(row.tenant_id, row.reference.as_str().to_owned()))
                        .map(|stored| Ok(upserted(row, stored)));
                }
            })
        }
        None => Ok(()),
    };
    match together {
        Err(error) if error.is_outage() => return Err(error),
        // The rows go one by one below, each to its own outcome.
        Ok(()) | Err(_) => {}
    }
    for (outcome, write) in outcomes.iter_mut().zip(writes) {
        if outcome.is_none() {
            let result = guarded!(conn, savepoints, |conn| one(conn, write));
            *outcome = Some(match result {
                Err(error) if error.is_outage() => return Err(error),
                result => result,
            });
        }
    }
    Ok(outcomes
        .into_iter()
        .map(|outcome| outcome.expect("every write has its outcome"))
        .collect())
}

/// The rows of writes that all have one kind with a multi-row statement.
enum MultiRow<'a> {
    Create(Vec<&'a NewUser>),
    Upsert(Vec<&'a NewUser>),
}

fn multi_row(writes: &[Write]) -> Option<MultiRow<'_>> {
    let creates: Option<Vec<&NewUser>> = writes
        .iter()
        .map(|write| match write {
            Write::Create(row) => Some(row),
            _ => None,
        })
        .collect();
    if let Some(rows) = creates {
        return Some(MultiRow::Create(rows));
    }
    let upserts: Option<Vec<&NewUser>> = writes
        .iter()
        .map(|write| match write {
            Write::Upsert(row) => Some(row),
            _ => None,
        })
        .collect();
    upserts.map(MultiRow::Upsert)
}

/// One write as one statement.
async fn one(conn: &mut AsyncPgConnection, write: &Write) -> diesel::QueryResult<Written> {
    match write {
        Write::Create(row) => insert(conn, row).await.map(Written::Created),
        Write::Upsert(row) => {
            let stored = upsert_all(conn, &[row])
                .await?
                .pop()
                .ok_or(diesel::result::Error::NotFound)?;
            Ok(upserted(row, stored))
        }
        Write::Update {
            id,
            tenant,
            changes,
        } => Ok(update(conn, *id, *tenant, changes)
            .await?
            .map_or(Written::Missing, Written::Updated)),
        Write::SetActive {
            id,
            tenant,
            active,
            at,
        } => set_active(conn, *id, *tenant, *active, *at).await,
    }
}

/// Created when the stored row is the one sent (its id), updated otherwise.
fn upserted(sent: &NewUser, stored: UserRow) -> Written {
    if stored.id == sent.id {
        Written::Created(stored)
    } else {
        Written::Updated(stored)
    }
}

async fn insert(conn: &mut AsyncPgConnection, user: &NewUser) -> diesel::QueryResult<UserRow> {
    diesel::insert_into(users::table)
        .values(UserInsert::from(user))
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
}

/// Inserts `rows` in one statement and returns those stored. A row that
/// clashes with a stored one, or with an earlier row of `rows`, on a unique
/// key is skipped; any other failure fails all of them.
async fn insert_all(
    conn: &mut AsyncPgConnection,
    rows: &[&NewUser],
) -> diesel::QueryResult<Vec<UserRow>> {
    diesel::insert_into(users::table)
        .values(
            rows.iter()
                .map(|row| UserInsert::from(*row))
                .collect::<Vec<_>>(),
        )
        .on_conflict_do_nothing()
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
}

/// Creates or updates every row, matched on (tenant_id, reference), in one
/// statement. A row that matches gets every column of `rows` but its id and
/// creation time. Any unique violation (an email taken) fails it as a whole.
async fn upsert_all(
    conn: &mut AsyncPgConnection,
    rows: &[&NewUser],
) -> diesel::QueryResult<Vec<UserRow>> {
    use diesel::upsert::{DecoratableTarget, excluded};
    diesel::insert_into(users::table)
        .values(
            rows.iter()
                .map(|row| UserInsert::from(*row))
                .collect::<Vec<_>>(),
        )
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
            users::updated_at.eq(after(excluded(users::updated_at))),
        ))
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
}

/// Applies `changes`; `None` when no user in scope has this id.
async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    changes: &UserChanges,
) -> diesel::QueryResult<Option<UserRow>> {
    diesel::update(users::table)
        .filter(users::id.eq(id))
        .filter(in_scope(tenant))
        .set((
            UserChangeset::from(changes),
            users::updated_at.eq(after(changes.at)),
        ))
        .returning(UserRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
        .optional()
}

/// Sets the active flag. A user already in that state is returned unchanged
/// (its `updated_at` stays), which makes (de)activation idempotent. The row
/// is locked first, so the outcome is the state this call produced or found,
/// whatever a concurrent call does.
async fn set_active(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    active: bool,
    at: DateTime<Utc>,
) -> diesel::QueryResult<Written> {
    conn.transaction(async |conn| {
        let Some(current) = users::table
            .filter(users::id.eq(id))
            .filter(in_scope(tenant))
            .select(UserRow::as_select())
            .for_update()
            .first(conn)
            .await
            .optional()?
        else {
            return Ok(Written::Missing);
        };
        if current.active == active {
            return Ok(Written::Unchanged(current));
        }
        diesel::update(users::table)
            .filter(users::tenant_id.eq(current.tenant_id))
            .filter(users::id.eq(id))
            .set((users::active.eq(active), users::updated_at.eq(after(at))))
            .returning(UserRow::as_returning())
            .get_results(conn)
            .await
            .and_then(db::single)
            .map(Written::Updated)
    })
    .await
}

diesel::define_sql_function! {
    /// The larger of two values (Postgres' GREATEST).
    fn greatest(a: Timestamptz, b: Timestamptz) -> Timestamptz;
}

/// The `updated_at` of a change made at `at`: computed in the statement,
/// after the row lock, as the later of `at` and the stored `updated_at` plus
/// a microsecond, so that each committed change to a user has a later
/// `updated_at` than the one before, whatever order the calls' clocks were
/// read in.
fn after<T>(
    at: T,
) -> greatest<T, diesel::dsl::Add<users::updated_at, diesel::data_types::PgInterval>>
where
    T: diesel::expression::AsExpression<diesel::sql_types::Timestamptz>,
{
    use diesel::dsl::IntervalDsl;
    greatest(at, users::updated_at + 1.microseconds())
}

/// CreateUser for the calls of one batch: their rows by [`apply`], each
/// committing on its own.
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
    ) -> Result<Vec<Result<UserRow, StoreError>>, StoreError> {
        let writes: Vec<Write> = items.into_iter().map(Write::Create).collect();
        Ok(apply(conn, &writes, Commit::Apart)
            .await?
            .into_iter()
            .map(|outcome| {
                outcome.and_then(|written| {
                    written
                        .into_row()
                        .ok_or_else(|| StoreError::Other("a create stored no row".into()))
                })
            })
            .collect())
    }
}
