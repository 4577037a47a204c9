//! Row types: what the tables hold, and what inserts and updates write.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{tenants, users};
use crate::domain::{AvatarUrl, CustomData, Email, Locale, Phone, ShortText, TimeZone};

/// One row of `users` (also as `to_jsonb` writes it, in change events).
#[derive(Debug, Clone, PartialEq, Queryable, Selectable, serde::Deserialize)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg))]
pub struct UserRow {
    pub tenant_id: Uuid,
    pub id: Uuid,
    pub reference: String,
    pub email: String,
    pub phone: String,
    pub first_name: String,
    pub last_name: String,
    pub locale: String,
    pub timezone: String,
    pub is_opted_in: bool,
    pub active: bool,
    pub custom_data: serde_json::Value,
    pub avatar_url: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delete_time: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
    pub updated_by: String,
}

impl UserRow {
    /// The version of the user a conditional write must name.
    pub fn etag(&self) -> Etag {
        Etag(self.updated_at)
    }
}

/// A version of a user: changes with every change to it.
///
/// It is the user's `updated_at`, which the write path makes strictly
/// increase with each committed change (`users::write::after`), so no
/// column is needed to keep it and a conditional write is one comparison
/// in its statement. On the wire it is opaque: the microseconds in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Etag(DateTime<Utc>);

impl Etag {
    /// Longest etag a request may carry.
    pub const MAX_LEN: usize = 64;

    pub fn parse(input: &str) -> Result<Self, String> {
        const BAD: &str = "is not an etag of this service: send back a user's `etag` as read";
        if input.len() > Self::MAX_LEN {
            return Err(format!("at most {} characters", Self::MAX_LEN));
        }
        i64::from_str_radix(input, 16)
            .ok()
            .filter(|_| input.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(DateTime::from_timestamp_micros)
            .map(Self)
            .ok_or_else(|| BAD.to_owned())
    }

    pub fn time(self) -> DateTime<Utc> {
        self.0
    }
}

impl std::fmt::Display for Etag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0.timestamp_micros())
    }
}

/// Who made a change, as `users.updated_by` and `request_ids.caller` store
/// it: `key:<api key id>` or `user:<user id>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor(String);

impl Actor {
    pub fn key(id: &str) -> Self {
        Self(format!("key:{id}"))
    }

    pub fn user(id: Uuid) -> Self {
        Self(format!("user:{id}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The API key id and the user id of a stored actor; empty when not that kind.
    pub fn parts(stored: &str) -> (&str, &str) {
        match stored.split_once(':') {
            Some(("key", id)) => (id, ""),
            Some(("user", id)) => ("", id),
            _ => ("", ""),
        }
    }
}

/// A user to insert, made of validated values: nothing past the edge
/// re-checks them. `None` is stored as the empty string (not set).
#[derive(Debug, Clone, PartialEq)]
pub struct NewUser {
    pub tenant_id: Uuid,
    pub id: Uuid,
    pub reference: ShortText,
    pub email: Option<Email>,
    pub phone: Option<Phone>,
    pub first_name: ShortText,
    pub last_name: ShortText,
    pub locale: Locale,
    pub timezone: Option<TimeZone>,
    pub is_opted_in: bool,
    pub active: bool,
    pub custom_data: CustomData,
    pub avatar_url: Option<AvatarUrl>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub updated_by: Actor,
}

impl NewUser {
    /// The row an insert of this user stores.
    pub fn as_row(&self) -> UserRow {
        UserRow {
            tenant_id: self.tenant_id,
            id: self.id,
            reference: self.reference.as_str().to_owned(),
            email: self.email.as_ref().map_or("", Email::as_str).to_owned(),
            phone: self.phone.as_ref().map_or("", Phone::as_str).to_owned(),
            first_name: self.first_name.as_str().to_owned(),
            last_name: self.last_name.as_str().to_owned(),
            locale: self.locale.as_str().to_owned(),
            timezone: self
                .timezone
                .as_ref()
                .map_or("", |zone| zone.as_str())
                .to_owned(),
            is_opted_in: self.is_opted_in,
            active: self.active,
            custom_data: self.custom_data.as_value().clone(),
            avatar_url: self
                .avatar_url
                .as_ref()
                .map_or("", AvatarUrl::as_str)
                .to_owned(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            delete_time: None,
            expire_time: None,
            updated_by: self.updated_by.as_str().to_owned(),
        }
    }
}

/// A partial update of a user, made of validated values. `None` leaves a
/// field as it is; for fields that may be unset, `Some(None)` clears it.
#[derive(Debug, Clone, PartialEq)]
pub struct UserChanges {
    pub email: Option<Option<Email>>,
    pub phone: Option<Option<Phone>>,
    pub first_name: Option<ShortText>,
    pub last_name: Option<ShortText>,
    pub locale: Option<Locale>,
    pub timezone: Option<Option<TimeZone>>,
    pub is_opted_in: Option<bool>,
    pub active: Option<bool>,
    pub custom_data: Option<CustomData>,
    pub avatar_url: Option<Option<AvatarUrl>>,
    /// The service's time of the change; the stored `updated_at` is the
    /// later of it and the previous `updated_at` plus a microsecond.
    pub at: DateTime<Utc>,
    pub by: Actor,
}

/// One row of `tenants`.
#[derive(Debug, Clone, PartialEq, Queryable, Selectable)]
#[diesel(table_name = tenants, check_for_backend(diesel::pg::Pg))]
pub struct TenantRow {
    pub id: Uuid,
    pub name: String,
    pub reference: String,
    pub is_default: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub delete_time: Option<DateTime<Utc>>,
    pub expire_time: Option<DateTime<Utc>>,
}

/// A tenant to insert.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = tenants)]
pub struct NewTenant {
    pub id: Uuid,
    pub name: String,
    pub reference: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A partial update of a tenant: `None` leaves the column as it is.
#[derive(Debug, Clone, Default, AsChangeset)]
#[diesel(table_name = tenants)]
pub struct TenantChanges {
    pub name: Option<String>,
    pub reference: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etag_reads_back_as_the_version_it_was_made_from() {
        let at = DateTime::from_timestamp_micros(1_796_181_328_574_937).unwrap();
        let etag = Etag(at).to_string();
        assert_eq!(etag, "6619e0e0ab9d9");
        assert_eq!(Etag::parse(&etag), Ok(Etag(at)));
    }

    #[test]
    fn an_etag_the_service_did_not_make_is_refused() {
        for bad in [
            "",
            "nonsense",
            "+1f",
            "-1",
            "0x1f",
            &"f".repeat(65),
            "ffffffffffffffffff",
        ] {
            assert!(Etag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_actor_is_stored_by_kind() {
        let user = Uuid::nil();
        assert_eq!(Actor::key("k1").as_str(), "key:k1");
        assert_eq!(Actor::parts("key:k1"), ("k1", ""));
        assert_eq!(
            Actor::parts(Actor::user(user).as_str()),
            ("", &*user.to_string())
        );
        assert_eq!(Actor::parts(""), ("", ""));
    }
}
