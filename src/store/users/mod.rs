//! Queries on `users`: reads, lists, and every change, which goes through
//! the one write path of [`write`].

mod count;
mod list;
mod read;
mod write;

use diesel::ExpressionMethods;
use uuid::Uuid;

use super::filter::{Boxed, TextOp, TimeOp, UuidOp};
use super::schema::users;

pub use list::{ListQuery, list};
pub use read::{FindUsers, active_flag, export_chunk, find};
pub use write::{
    Commit, InsertUsers, Outcomes, Write, Written, apply, apply_one, delete_tenant, purge_expired,
    purge_tenant, undelete_tenant,
};

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
    AvatarUrl,
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
    /// Absent unless the user is deleted: a comparison never matches then.
    DeleteTime,
    /// Absent unless the user is deleted: a comparison never matches then.
    ExpireTime,
}

/// One condition of a user list; a list ANDs all of its conditions.
///
/// Every condition is true or false for every row, never SQL's unknown, so
/// that [`Condition::Not`] matches exactly the rows its condition does not.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// On `email`, the comparisons ignore case (as its unique index does).
    Text(TextField, TextOp),
    Uuid(UuidField, UuidOp),
    /// The column equals the value.
    Bool(BoolField, bool),
    Time(TimeField, TimeOp),
    /// `custom_data @> value`.
    CustomDataContains(serde_json::Value),
    /// Case-insensitive substring of email, first name or last name.
    Search(String),
    /// Not deleted.
    Live,
    /// The last change was made by this actor (`users.updated_by`).
    UpdatedBy(super::models::Actor),
    /// Every condition holds; true when there is none.
    All(Vec<Condition>),
    /// At least one condition holds; false when there is none.
    Any(Vec<Condition>),
    /// The condition does not hold.
    Not(Box<Condition>),
}

/// A column users can be ordered by. `Id` is the final tie-breaker of every order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// The users a call may reach: all, or those of one tenant. A user outside
/// the scope is treated as if it did not exist.
fn in_scope(tenant: Option<Uuid>) -> Boxed<users::table> {
    match tenant {
        Some(tenant) => Box::new(users::tenant_id.eq(tenant)),
        // Always true: the column is NOT NULL.
        None => Box::new(users::tenant_id.is_not_null()),
    }
}
