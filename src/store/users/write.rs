//! The one path of every change to users.
//!
//! CreateUser (through its coalescer, [`InsertUsers`]), UpdateUser,
//! DeactivateUser, ReactivateUser and BatchUpsertUsers (and `import`, which
//! calls it) all reach the database through [`apply`]. A rule that every
//! change must follow (write an event row, check and bump an etag) is
//! written here, once. So is its converse: a write that would change
//! nothing writes nothing ([`Written::Unchanged`]), so that `updated_at`,
//! `updated_by` and the change feed move only with a change.
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
use crate::store::filter::Boxed;
use crate::store::models::{Actor, Etag, NewUser, UserChanges, UserRow};
use crate::store::prepared::Update;
use crate::store::requests;
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
    /// A new user or, when its tenant has a live user with its reference,
    /// that user with every field of this one but its id and creation time.
    /// A deleted user's reference stays reserved: [`Written::Reserved`]. A
    /// user that already has every field of this one stays as it is,
    /// `updated_at` and `updated_by` included: [`Written::Unchanged`].
    Upsert(NewUser),
    /// The fields `changes` sets, on the live user with this id if the
    /// scope (one tenant, or all) has it. A user that already has them all
    /// (or `changes` sets none) stays as it is, `updated_at` and
    /// `updated_by` included: [`Written::Unchanged`].
    Update {
        id: Uuid,
        tenant: Option<Uuid>,
        changes: UserChanges,
        etag: Option<Etag>,
    },
    /// The active flag of the live user with this id; a user already in
    /// that state stays as it is, `updated_at` included.
    SetActive {
        id: Uuid,
        tenant: Option<Uuid>,
        active: bool,
        at: DateTime<Utc>,
        by: Actor,
        etag: Option<Etag>,
    },
    /// Deletes the live user with this id softly, until `until`.
    Delete {
        id: Uuid,
        tenant: Option<Uuid>,
        at: DateTime<Utc>,
        until: DateTime<Utc>,
        by: Actor,
        etag: Option<Etag>,
    },
    /// Restores the deleted user with this id, if `at` is before its
    /// `expire_time`.
    Undelete {
        id: Uuid,
        tenant: Option<Uuid>,
        at: DateTime<Utc>,
        by: Actor,
        etag: Option<Etag>,
    },
    /// Erases the deleted user with this id, and every stored response
    /// about it ([`requests::erase`]).
    Purge { id: Uuid, tenant: Option<Uuid> },
}

/// What one write did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    Created(UserRow),
    Updated(UserRow),
    /// The user already was as asked: nothing was written.
    Unchanged(UserRow),
    /// The write's etag is not the user's: nothing was written. The user as
    /// it is now.
    Stale(UserRow),
    /// The write needs a deleted user and this one is live (a purge):
    /// nothing was written.
    Live(UserRow),
    /// The user was erased.
    Purged(Uuid),
    /// The upsert's reference belongs to a deleted user: nothing was written.
    Reserved,
    /// No user in the write's scope, in the state the write needs, has its id.
    Missing,
}

impl Written {
    /// The user after a write that stored or kept it.
    pub fn into_row(self) -> Option<UserRow> {
        match self {
            Self::Created(row) | Self::Updated(row) | Self::Unchanged(row) => Some(row),
            Self::Stale(_) | Self::Live(_) | Self::Purged(_) | Self::Reserved | Self::Missing => {
                None
            }
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
    updated_by: &'a str,
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
            updated_by: user.updated_by.as_str(),
        }
    }
}

/// [`UserChanges`] as `users` stores them: `None` leaves a column alone.
/// Its fields but `updated_by` are the columns of [`sent_columns!`].
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
    updated_by: &'a str,
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
            updated_by: changes.by.as_str(),
        }
    }
}

/// Calls `$then!` with the columns a write sets from what its caller sent:
/// all but the key, the id, the times and the actor (after `$arg;` when
/// given). An update's changeset and an upsert's assignments both name them
/// from here.
macro_rules! sent_columns {
    ($then:ident $(, $arg:ident)?) => {
        $then!(
            $($arg;)?
            email,
            phone,
            first_name,
            last_name,
            locale,
            timezone,
            is_opted_in,
            active,
            custom_data,
            avatar_url
        )
    };
}

/// `((column = value, ...), condition)` for the columns given: each set to
/// `$value!(column)`, and the condition that one of them changes.
macro_rules! assigned_and_differs {
    ($value:ident; $first:ident $(, $column:ident)*) => {(
        (
            users::$first.eq($value!($first)),
            $(users::$column.eq($value!($column)),)*
        ),
        users::$first.is_distinct_from($value!($first))
            $(.or(users::$column.is_distinct_from($value!($column))))*
    )};
}

impl UserChangeset<'_> {
    /// Whether it sets a column (`updated_by` aside, which is not a change
    /// of its own).
    fn sets_any(&self) -> bool {
        macro_rules! any_set {
            ($($column:ident),*) => { false $(|| self.$column.is_some())* };
        }
        sent_columns!(any_set)
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
        // In a transaction of its own (a savepoint in the caller's) already.
        Some(MultiRow::Upsert(rows)) => upsert_told(conn, &rows)
            .await
            .map_err(StoreError::from)
            .map(|written| {
                for (outcome, written) in outcomes.iter_mut().zip(written) {
                    *outcome = Some(Ok(written));
                }
            }),
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

/// One write, as one statement where it can be.
async fn one(conn: &mut AsyncPgConnection, write: &Write) -> diesel::QueryResult<Written> {
    match write {
        Write::Create(row) => insert(conn, row).await.map(Written::Created),
        Write::Upsert(row) => match upsert_all(conn, &[row]).await?.pop() {
            Some(stored) => Ok(upserted(row, stored)),
            // Left as it is: why, only a read-back under the row's lock
            // tells, so the statement goes again in a transaction.
            None => upsert_told(conn, &[row])
                .await
                .and_then(|mut written| written.pop().ok_or(diesel::result::Error::NotFound)),
        },
        Write::Update {
            id,
            tenant,
            changes,
            etag,
        } => update(conn, *id, *tenant, changes, *etag).await,
        Write::SetActive {
            id,
            tenant,
            active,
            at,
            by,
            etag,
        } => {
            conn.transaction(async |conn| {
                let current = match lock(conn, *id, *tenant, Need::Live, *etag).await? {
                    Ok(current) => current,
                    Err(written) => return Ok(written),
                };
                if current.active == *active {
                    return Ok(Written::Unchanged(current));
                }
                change(conn, &current, (users::active.eq(*active), stamp(*at, by))).await
            })
            .await
        }
        Write::Delete {
            id,
            tenant,
            at,
            until,
            by,
            etag,
        } => {
            conn.transaction(async |conn| {
                let current = match lock(conn, *id, *tenant, Need::Live, *etag).await? {
                    Ok(current) => current,
                    Err(written) => return Ok(written),
                };
                let deleted = (
                    users::delete_time.eq(Some(*at)),
                    users::expire_time.eq(Some(*until)),
                );
                change(conn, &current, (deleted, stamp(*at, by))).await
            })
            .await
        }
        Write::Undelete {
            id,
            tenant,
            at,
            by,
            etag,
        } => {
            conn.transaction(async |conn| {
                let current = match lock(conn, *id, *tenant, Need::Deleted, *etag).await? {
                    Ok(current) => current,
                    Err(written) => return Ok(written),
                };
                if current.expire_time.is_some_and(|expiry| expiry <= *at) {
                    // Past its purge time: as good as purged.
                    return Ok(Written::Missing);
                }
                let restored = (
                    users::delete_time.eq(None::<DateTime<Utc>>),
                    users::expire_time.eq(None::<DateTime<Utc>>),
                );
                change(conn, &current, (restored, stamp(*at, by))).await
            })
            .await
        }
        Write::Purge { id, tenant } => {
            conn.transaction(async |conn| {
                let current = match lock(conn, *id, *tenant, Need::Any, None).await? {
                    Ok(current) => current,
                    Err(written) => return Ok(written),
                };
                if current.delete_time.is_none() {
                    return Ok(Written::Live(current));
                }
                erase(conn, &[(current.tenant_id, current.id)]).await?;
                Ok(Written::Purged(current.id))
            })
            .await
        }
    }
}

/// The state of a user a write needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Live,
    Deleted,
    Any,
}

/// The user with this id, locked for the rest of the transaction, so that
/// the outcome is the state this call produced or found, whatever a
/// concurrent call does. `Err` with the outcome when the write stops here:
/// [`Written::Missing`] when the scope has no such user in the state `need`
/// names, [`Written::Stale`] when `etag` is given and is not the user's.
async fn lock(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    need: Need,
    etag: Option<Etag>,
) -> diesel::QueryResult<Result<UserRow, Written>> {
    let Some(current) = users::table
        .filter(users::id.eq(id))
        .filter(in_scope(tenant))
        .select(UserRow::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()?
    else {
        return Ok(Err(Written::Missing));
    };
    let fits = match need {
        Need::Live => current.delete_time.is_none(),
        Need::Deleted => current.delete_time.is_some(),
        Need::Any => true,
    };
    if !fits {
        return Ok(Err(Written::Missing));
    }
    if etag.is_some_and(|etag| etag != current.etag()) {
        return Ok(Err(Written::Stale(current)));
    }
    Ok(Ok(current))
}

/// The type of [`stamp`].
type Stamp<'a> = (
    diesel::dsl::Eq<users::updated_at, After<DateTime<Utc>>>,
    diesel::dsl::Eq<users::updated_by, &'a str>,
);

/// The columns every change sets besides its own: when, and by whom.
fn stamp(at: DateTime<Utc>, by: &Actor) -> Stamp<'_> {
    (
        users::updated_at.eq(after(at)),
        users::updated_by.eq(by.as_str()),
    )
}

/// Writes `changes` to the locked row `current`.
async fn change<C>(
    conn: &mut AsyncPgConnection,
    current: &UserRow,
    changes: C,
) -> diesel::QueryResult<Written>
where
    C: AsChangeset<Target = users::table>,
    C::Changeset: diesel::query_builder::QueryFragment<diesel::pg::Pg> + Send,
{
    use diesel::BoolExpressionMethods;
    let target = users::tenant_id
        .eq(current.tenant_id)
        .and(users::id.eq(current.id));
    Update::new(users::table, changes, target, UserRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
        .map(Written::Updated)
}

/// Deletes the users `ids` (tenant, id) and erases every stored response
/// about them; the caller's transaction makes it all or nothing.
pub(crate) async fn erase(
    conn: &mut AsyncPgConnection,
    ids: &[(Uuid, Uuid)],
) -> diesel::QueryResult<()> {
    for chunk in ids.chunks(ERASE_CHUNK) {
        let tenants: Vec<Uuid> = chunk.iter().map(|(tenant, _)| *tenant).collect();
        let users: Vec<Uuid> = chunk.iter().map(|(_, id)| *id).collect();
        // Ids are unique across tenants (the service makes them); the
        // tenants only keep the delete on the primary key's ground.
        diesel::delete(
            users::table
                .filter(users::tenant_id.eq_any(&tenants))
                .filter(users::id.eq_any(&users)),
        )
        .execute(conn)
        .await?;
        requests::erase_users(conn, &users).await?;
    }
    Ok(())
}

/// Users erased by one statement.
const ERASE_CHUNK: usize = 500;

/// Created when the stored row is the one sent (its id), updated otherwise.
fn upserted(sent: &NewUser, stored: UserRow) -> Written {
    if stored.id == sent.id {
        Written::Created(stored)
    } else {
        Written::Updated(stored)
    }
}

/// Inserts one user. Its values go column by column (`column = value`):
/// a statement diesel prepares once and Postgres plans once, where an
/// `Insertable` struct's values (each of which could be DEFAULT) make a new
/// statement at every call, prepared and planned again, one more round trip.
async fn insert(conn: &mut AsyncPgConnection, user: &NewUser) -> diesel::QueryResult<UserRow> {
    let UserInsert {
        tenant_id,
        id,
        reference,
        email,
        phone,
        first_name,
        last_name,
        locale,
        timezone,
        is_opted_in,
        active,
        custom_data,
        avatar_url,
        created_at,
        updated_at,
        updated_by,
    } = UserInsert::from(user);
    diesel::insert_into(users::table)
        .values((
            users::tenant_id.eq(tenant_id),
            users::id.eq(id),
            users::reference.eq(reference),
            users::email.eq(email),
            users::phone.eq(phone),
            users::first_name.eq(first_name),
            users::last_name.eq(last_name),
            users::locale.eq(locale),
            users::timezone.eq(timezone),
            users::is_opted_in.eq(is_opted_in),
            users::active.eq(active),
            users::custom_data.eq(custom_data),
            users::avatar_url.eq(avatar_url),
            users::created_at.eq(created_at),
            users::updated_at.eq(updated_at),
            users::updated_by.eq(updated_by),
        ))
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

/// [`upsert_all`], and the outcome of each row, in order. A row the
/// statement left alone is read back, in the same transaction, under the
/// lock the statement took on it: [`Written::Reserved`] when its user is
/// deleted, [`Written::Unchanged`] when that user already had every field
/// of the row.
async fn upsert_told(
    conn: &mut AsyncPgConnection,
    rows: &[&NewUser],
) -> diesel::QueryResult<Vec<Written>> {
    conn.transaction(async |conn| {
        // RETURNING order is not guaranteed: rows are matched by their key.
        let mut told: HashMap<(Uuid, String), Written> = HashMap::with_capacity(rows.len());
        let mut sent: HashMap<(Uuid, String), &NewUser> = rows
            .iter()
            .map(|row| ((row.tenant_id, row.reference.as_str().to_owned()), *row))
            .collect();
        for stored in upsert_all(conn, rows).await? {
            let key = (stored.tenant_id, stored.reference.clone());
            if let Some(row) = sent.remove(&key) {
                told.insert(key, upserted(row, stored));
            }
        }
        if !sent.is_empty() {
            let left: Vec<(Uuid, &str)> = sent
                .keys()
                .map(|(tenant, reference)| (*tenant, reference.as_str()))
                .collect();
            for kept in by_keys(conn, &left).await? {
                let key = (kept.tenant_id, kept.reference.clone());
                let written = if kept.delete_time.is_some() {
                    Written::Reserved
                } else {
                    Written::Unchanged(kept)
                };
                told.insert(key, written);
            }
        }
        rows.iter()
            .map(|row| {
                told.remove(&(row.tenant_id, row.reference.as_str().to_owned()))
                    .ok_or_else(|| {
                        diesel::result::Error::QueryBuilderError(
                            "an upserted row was neither written nor found".into(),
                        )
                    })
            })
            .collect()
    })
    .await
}

/// The users with these keys (tenant_id, reference), each a non-empty
/// reference: one statement, on the unique index of the keys.
async fn by_keys(
    conn: &mut AsyncPgConnection,
    keys: &[(Uuid, &str)],
) -> diesel::QueryResult<Vec<UserRow>> {
    use diesel::sql_types::{Array, Bool, Text};
    let (tenants, references): (Vec<Uuid>, Vec<&str>) = keys.iter().copied().unzip();
    let listed =
        diesel::dsl::sql::<Bool>("(users.tenant_id, users.reference) IN (SELECT * FROM unnest(")
            .bind::<Array<diesel::sql_types::Uuid>, _>(tenants)
            .sql(", ")
            .bind::<Array<Text>, _>(references)
            .sql("))");
    users::table
        // The unique index is partial: on non-empty references.
        .filter(users::reference.ne(""))
        .filter(listed)
        .select(UserRow::as_select())
        .load(conn)
        .await
}

/// Creates or updates every row, matched on (tenant_id, reference), in one
/// statement. A row that matches gets every column of `rows` but its id and
/// creation time, unless it already has them all (then it is left as it is,
/// `updated_at` included, and not returned). Any unique violation (an email
/// taken) fails it as a whole.
async fn upsert_all(
    conn: &mut AsyncPgConnection,
    rows: &[&NewUser],
) -> diesel::QueryResult<Vec<UserRow>> {
    use diesel::upsert::{DecoratableTarget, excluded};
    use diesel::{BoolExpressionMethods, PgExpressionMethods};
    // Each column sent takes the row's value.
    macro_rules! sent {
        ($column:ident) => {
            excluded(users::$column)
        };
    }
    let (assigned, differs) = sent_columns!(assigned_and_differs, sent);
    let statement = diesel::insert_into(users::table)
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
            assigned,
            users::updated_at.eq(after(excluded(users::updated_at))),
            users::updated_by.eq(excluded(users::updated_by)),
        ));
    // A deleted user's reference stays reserved, and a user that already
    // is as sent stays as it is: either row is left alone, and returned by
    // nothing. (`ON CONFLICT ... DO UPDATE ... WHERE`, which still locks
    // it.)
    diesel::query_dsl::methods::FilterDsl::filter(
        statement,
        users::delete_time.is_null().and(differs),
    )
    .returning(UserRow::as_returning())
    .get_results(conn)
    .await
}

/// Applies `changes` to the live user with this id, if the scope has it,
/// `etag`, when given, is its etag, and `changes` change something: one
/// statement, so that the checks and the write cannot be split by another
/// write. When it writes nothing, the user, locked, tells why: missing,
/// stale, or already as asked ([`Written::Unchanged`]: nothing is written,
/// so neither `updated_at` nor the change feed moves). A change committed
/// in between may have made `changes` a change again: it is written then,
/// under the lock.
async fn update(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    changes: &UserChanges,
    etag: Option<Etag>,
) -> diesel::QueryResult<Written> {
    if let Some(row) = update_row(conn, id, tenant, changes, etag).await? {
        return Ok(Written::Updated(row));
    }
    conn.transaction(async |conn| {
        let current = match lock(conn, id, tenant, Need::Live, etag).await? {
            Ok(current) => current,
            Err(written) => return Ok(written),
        };
        Ok(match update_row(conn, id, tenant, changes, etag).await? {
            Some(row) => Written::Updated(row),
            None => Written::Unchanged(current),
        })
    })
    .await
}

/// The statement of [`update`]: the user after it, or `None` when it wrote
/// nothing (no statement at all when `changes` set no field).
///
/// Its text is the same whatever `changes` sets (per scope and etag), so
/// that a connection prepares it once: every column is set to the value
/// sent, or to its own when none was sent, and the statement writes only
/// when one of them differs from the stored value.
async fn update_row(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    tenant: Option<Uuid>,
    changes: &UserChanges,
    etag: Option<Etag>,
) -> diesel::QueryResult<Option<UserRow>> {
    use diesel::{BoolExpressionMethods, PgExpressionMethods};
    let sent = UserChangeset::from(changes);
    if !sent.sets_any() {
        return Ok(None);
    }
    // Each column takes the value sent, or keeps its own.
    macro_rules! kept_unless_sent {
        ($column:ident) => {
            coalesce(sent.$column, users::$column)
        };
    }
    let (assigned, differs) = sent_columns!(assigned_and_differs, kept_unless_sent);
    let version: Boxed<users::table> = match etag {
        Some(etag) => Box::new(users::updated_at.eq(etag.time())),
        None => Box::new(users::updated_at.is_not_null()),
    };
    let target = users::id
        .eq(id)
        .and(in_scope(tenant))
        .and(users::delete_time.is_null())
        .and(version)
        .and(differs);
    let changed = (
        assigned,
        users::updated_at.eq(after(changes.at)),
        users::updated_by.eq(sent.updated_by),
    );
    Update::new(users::table, changed, target, UserRow::as_returning())
        .get_results(conn)
        .await
        .and_then(db::single)
        .optional()
}

diesel::define_sql_function! {
    /// The first of its values that is not NULL (Postgres' COALESCE).
    fn coalesce<T: diesel::sql_types::SingleValue>(sent: diesel::sql_types::Nullable<T>, kept: T) -> T;
}

/// The type of [`after`].
type After<T> = greatest<T, diesel::dsl::Add<users::updated_at, diesel::data_types::PgInterval>>;

diesel::define_sql_function! {
    /// The larger of two values (Postgres' GREATEST).
    fn greatest(a: Timestamptz, b: Timestamptz) -> Timestamptz;
}

/// The `updated_at` of a change made at `at`: computed in the statement,
/// after the row lock, as the later of `at` and the stored `updated_at` plus
/// a microsecond, so that each committed change to a user has a later
/// `updated_at` than the one before, whatever order the calls' clocks were
/// read in.
fn after<T>(at: T) -> After<T>
where
    T: diesel::expression::AsExpression<diesel::sql_types::Timestamptz>,
{
    use diesel::dsl::IntervalDsl;
    greatest(at, users::updated_at + 1.microseconds())
}

/// CreateUser for the calls of one batch: their rows by [`apply`], each
/// committing on its own; a create that carries the record of its request
/// ([`requests::NewRecord`]) commits with it ([`insert_recorded`]).
#[derive(Debug, Default)]
pub struct InsertUsers {
    /// Told after each batch: its rows' events committed.
    pub committed: crate::store::events::Committed,
}

impl Batch for InsertUsers {
    type Item = (NewUser, Option<requests::NewRecord>);
    type Output = UserRow;
    const MAX: usize = 64;
    /// A commit waits for its WAL flush: two at once overlap them.
    const POOL_SHARE: usize = 2;
    const NAME: &'static str = "create_user";
    const STATEMENT: (&'static str, Option<&'static str>) = ("INSERT", Some("users"));

    async fn run(
        &self,
        conn: &mut AsyncPgConnection,
        items: Vec<Self::Item>,
    ) -> Result<Vec<Result<UserRow, StoreError>>, StoreError> {
        let mut outcomes: Vec<Option<Result<UserRow, StoreError>>> = vec![None; items.len()];
        let (recorded, plain): (Vec<_>, Vec<_>) = items
            .into_iter()
            .enumerate()
            .partition(|(_, (_, record))| record.is_some());

        let writes: Vec<Write> = plain
            .iter()
            .map(|(_, (user, _))| Write::Create(user.clone()))
            .collect();
        for ((i, _), outcome) in plain.iter().zip(apply(conn, &writes, Commit::Apart).await?) {
            outcomes[*i] = Some(outcome.and_then(|written| {
                written
                    .into_row()
                    .ok_or_else(|| StoreError::Other("a create stored no row".into()))
            }));
        }

        let recorded: Vec<(usize, NewUser, requests::NewRecord)> = recorded
            .into_iter()
            .filter_map(|(i, (user, record))| record.map(|record| (i, user, record)))
            .collect();
        // All in one statement; when that fails for its rows, each on its own.
        let together = match recorded.as_slice() {
            [] | [_] => None,
            several => Some(
                insert_recorded(conn, several)
                    .await
                    .map_err(StoreError::from),
            ),
        };
        match together {
            Some(Err(error)) if error.is_outage() => return Err(error),
            Some(Ok(rows)) => {
                let mut by_id: HashMap<Uuid, UserRow> =
                    rows.into_iter().map(|row| (row.id, row)).collect();
                for (i, user, _) in &recorded {
                    outcomes[*i] = by_id.remove(&user.id).map(Ok);
                }
            }
            None | Some(Err(_)) => {}
        }
        for item in &recorded {
            if outcomes[item.0].is_none() {
                let result = insert_recorded_one(conn, &item.1, &item.2)
                    .await
                    .map_err(StoreError::from);
                outcomes[item.0] = Some(match result {
                    Err(error) if error.is_outage() => return Err(error),
                    result => result,
                });
            }
        }
        // Every statement above committed on its own.
        self.committed.poke();
        Ok(outcomes
            .into_iter()
            .map(|outcome| outcome.expect("every create has its outcome"))
            .collect())
    }
}

/// [`insert_recorded`] of one user: a statement of one shape, which the
/// connection prepares once.
async fn insert_recorded_one(
    conn: &mut AsyncPgConnection,
    user: &NewUser,
    record: &requests::NewRecord,
) -> diesel::QueryResult<UserRow> {
    requests::WithRecords {
        records: diesel::insert_into(crate::store::schema::request_ids::table).values(record),
        statement: diesel::insert_into(users::table)
            .values(UserInsert::from(user))
            .returning(UserRow::as_returning()),
    }
    .get_results(conn)
    .await
    .and_then(db::single)
}

/// Inserts the users and the records of the requests that created them in
/// one statement: each record commits exactly when its user does. Any
/// refusal (a unique key taken, a request id already recorded) fails all.
async fn insert_recorded(
    conn: &mut AsyncPgConnection,
    items: &[(usize, NewUser, requests::NewRecord)],
) -> diesel::QueryResult<Vec<UserRow>> {
    let records: Vec<&requests::NewRecord> = items.iter().map(|(_, _, record)| record).collect();
    let users: Vec<UserInsert<'_>> = items
        .iter()
        .map(|(_, user, _)| UserInsert::from(user))
        .collect();
    requests::WithRecords {
        records: diesel::insert_into(crate::store::schema::request_ids::table).values(records),
        statement: diesel::insert_into(users::table)
            .values(users)
            .returning(UserRow::as_returning()),
    }
    .get_results(conn)
    .await
}

/// Deletes every live user of a tenant that is being deleted, with the
/// tenant's `delete_time` (`at`), which is how [`undelete_tenant`] finds
/// them again.
pub async fn delete_tenant(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    at: DateTime<Utc>,
    until: DateTime<Utc>,
    by: &Actor,
) -> diesel::QueryResult<usize> {
    diesel::update(
        users::table
            .filter(users::tenant_id.eq(tenant))
            .filter(users::delete_time.is_null()),
    )
    .set((
        users::delete_time.eq(Some(at)),
        users::expire_time.eq(Some(until)),
        stamp(at, by),
    ))
    .execute(conn)
    .await
}

/// Restores the users deleted with their tenant at `deleted_at`; users
/// deleted on their own stay deleted.
pub async fn undelete_tenant(
    conn: &mut AsyncPgConnection,
    tenant: Uuid,
    deleted_at: DateTime<Utc>,
    at: DateTime<Utc>,
    by: &Actor,
) -> diesel::QueryResult<usize> {
    diesel::update(
        users::table
            .filter(users::tenant_id.eq(tenant))
            .filter(users::delete_time.eq(deleted_at)),
    )
    .set((
        users::delete_time.eq(None::<DateTime<Utc>>),
        users::expire_time.eq(None::<DateTime<Utc>>),
        stamp(at, by),
    ))
    .execute(conn)
    .await
}

/// Erases every user of a tenant ([`erase`]), `ERASE_CHUNK` at a time.
pub async fn purge_tenant(conn: &mut AsyncPgConnection, tenant: Uuid) -> diesel::QueryResult<()> {
    loop {
        let ids: Vec<Uuid> = users::table
            .filter(users::tenant_id.eq(tenant))
            .select(users::id)
            .limit(ERASE_CHUNK as i64)
            .load(conn)
            .await?;
        if ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<(Uuid, Uuid)> = ids.into_iter().map(|id| (tenant, id)).collect();
        erase(conn, &keys).await?;
    }
}

/// Erases up to `limit` users whose `expire_time` is before `now`, in one
/// transaction; how many. Rows another transaction holds are left for the
/// next round.
pub async fn purge_expired(
    conn: &mut AsyncPgConnection,
    now: DateTime<Utc>,
    limit: i64,
) -> diesel::QueryResult<usize> {
    conn.transaction(async |conn| {
        let expired: Vec<(Uuid, Uuid)> = users::table
            .filter(users::expire_time.lt(now))
            .select((users::tenant_id, users::id))
            .limit(limit)
            .for_update()
            .skip_locked()
            .load(conn)
            .await?;
        erase(conn, &expired).await?;
        Ok(expired.len())
    })
    .await
}
