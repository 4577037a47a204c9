//! Conversions between wire types (`pb`) and rows, parsing every input field
//! into its domain type on the way in.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{AvatarUrl, CustomData, Email, Locale, Phone, ShortText, TimeZone, Violations};
use crate::error::Error;
use crate::pb::v1 as pb;
use crate::store::models::{
    Actor, Etag, NewTenant, NewUser, TenantChanges, TenantRow, UserChanges, UserRow,
};

/// Parses an id: malformed is INVALID_ARGUMENT (a well-formed unknown id is
/// NOT_FOUND later).
pub fn parse_id(field: &str, input: &str) -> Result<Uuid, Error> {
    let mut violations = Violations::new();
    match violations.check(field, uuid(input)) {
        Some(id) => Ok(id),
        None => Err(Error::InvalidArgument(violations.into_vec())),
    }
}

pub fn uuid(input: &str) -> Result<Uuid, String> {
    if input.is_empty() {
        return Err("is required".to_owned());
    }
    Uuid::try_parse(input)
        .map_err(|_| "must be a UUID such as 0190c8f2-5b7e-7c1a-9d3e-2f4a6b8c0d1e".to_owned())
}

/// A field that may be unset: empty means "not set" (`None`), anything else
/// must parse.
fn unset_or<T>(
    v: &mut Violations,
    field: &str,
    input: &str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Option<Option<T>> {
    if input.is_empty() {
        return Some(None);
    }
    v.check(field, parse(input)).map(Some)
}

/// Empty means the service default, `en-US`.
fn locale(v: &mut Violations, field: &str, input: &str) -> Option<Locale> {
    if input.is_empty() {
        return Some(Locale::default());
    }
    v.check(field, Locale::parse(input))
}

fn short_text(v: &mut Violations, field: &str, input: &str) -> Option<ShortText> {
    v.check(field, ShortText::parse(input))
}

fn custom_data(v: &mut Violations, field: &str, input: &prost_types::Struct) -> Option<CustomData> {
    v.check(field, super::json::custom_data(input))
}

/// Parses the user of a CreateUser request. Output-only fields are ignored.
/// Every bad field is reported, not only the first.
pub fn new_user(
    user: Option<pb::User>,
    default_tenant: Uuid,
    id: Uuid,
    now: DateTime<Utc>,
    by: &Actor,
) -> Result<NewUser, Error> {
    let Some(user) = user else {
        return Err(Error::invalid("user", "is required"));
    };
    let mut v = Violations::new();
    let tenant_id = if user.tenant_id.is_empty() {
        Some(default_tenant)
    } else {
        v.check("user.tenant_id", uuid(&user.tenant_id))
    };
    let reference = short_text(&mut v, "user.reference", &user.reference);
    let email = unset_or(&mut v, "user.email", &user.email, Email::parse);
    let phone = unset_or(
        &mut v,
        "user.phone",
        user.phone.as_deref().unwrap_or_default(),
        Phone::parse,
    );
    let first_name = short_text(&mut v, "user.first_name", &user.first_name);
    let last_name = short_text(&mut v, "user.last_name", &user.last_name);
    let locale = locale(&mut v, "user.locale", &user.locale);
    let timezone = unset_or(
        &mut v,
        "user.timezone",
        user.timezone.as_deref().unwrap_or_default(),
        TimeZone::parse,
    );
    let avatar_url = unset_or(
        &mut v,
        "user.avatar_url",
        &user.avatar_url,
        AvatarUrl::parse,
    );
    let custom_data = match &user.custom_data {
        Some(data) => custom_data(&mut v, "user.custom_data", data),
        None => Some(CustomData::default()),
    };
    // Every field parsed, or `v` says why not.
    let parsed = (|| {
        Some(NewUser {
            tenant_id: tenant_id?,
            id,
            reference: reference?,
            email: email?,
            phone: phone?,
            first_name: first_name?,
            last_name: last_name?,
            locale: locale?,
            timezone: timezone?,
            is_opted_in: user.is_opted_in,
            active: user.active.unwrap_or(true),
            custom_data: custom_data?,
            avatar_url: avatar_url?,
            created_at: now,
            updated_at: now,
            updated_by: by.clone(),
        })
    })();
    parsed
        .filter(|_| v.is_empty())
        .ok_or_else(|| Error::InvalidArgument(v.into_vec()))
}

/// Parses the changes of an UpdateUser request: absent fields stay as they are.
pub fn user_changes(
    update: Option<pb::UserUpdate>,
    now: DateTime<Utc>,
    by: Actor,
) -> Result<UserChanges, Error> {
    let update = update.unwrap_or_default();
    let mut v = Violations::new();
    // A present field that fails to parse becomes `None` here, but it also
    // leaves a violation, so the request is rejected below.
    let changes = UserChanges {
        email: update
            .email
            .as_deref()
            .and_then(|s| unset_or(&mut v, "user.email", s, Email::parse)),
        phone: update
            .phone
            .as_deref()
            .and_then(|s| unset_or(&mut v, "user.phone", s, Phone::parse)),
        first_name: update
            .first_name
            .as_deref()
            .and_then(|s| short_text(&mut v, "user.first_name", s)),
        last_name: update
            .last_name
            .as_deref()
            .and_then(|s| short_text(&mut v, "user.last_name", s)),
        locale: update
            .locale
            .as_deref()
            .and_then(|s| locale(&mut v, "user.locale", s)),
        timezone: update
            .timezone
            .as_deref()
            .and_then(|s| unset_or(&mut v, "user.timezone", s, TimeZone::parse)),
        avatar_url: update
            .avatar_url
            .as_deref()
            .and_then(|s| unset_or(&mut v, "user.avatar_url", s, AvatarUrl::parse)),
        custom_data: update
            .custom_data
            .as_ref()
            .and_then(|data| custom_data(&mut v, "user.custom_data", data)),
        is_opted_in: update.is_opted_in,
        active: update.active,
        at: now,
        by,
    };
    if !v.is_empty() {
        return Err(Error::InvalidArgument(v.into_vec()));
    }
    Ok(changes)
}

/// Parses the tenant of a CreateTenant request.
pub fn new_tenant(
    tenant: Option<pb::Tenant>,
    id: Uuid,
    now: DateTime<Utc>,
) -> Result<NewTenant, Error> {
    let Some(tenant) = tenant else {
        return Err(Error::invalid("tenant", "is required"));
    };
    let mut v = Violations::new();
    let name = tenant_name(&mut v, &tenant.name);
    let reference =
        short_text(&mut v, "tenant.reference", &tenant.reference).map(ShortText::into_inner);
    let (Some(name), Some(reference)) = (name, reference) else {
        return Err(Error::InvalidArgument(v.into_vec()));
    };
    Ok(NewTenant {
        id,
        name,
        reference,
        created_at: now,
        updated_at: now,
    })
}

fn tenant_name(v: &mut Violations, input: &str) -> Option<String> {
    if input.is_empty() {
        v.push("tenant.name", "is required");
        return None;
    }
    short_text(v, "tenant.name", input).map(ShortText::into_inner)
}

/// Parses the changes of an UpdateTenant request.
pub fn tenant_changes(
    update: Option<pb::TenantUpdate>,
    now: DateTime<Utc>,
) -> Result<TenantChanges, Error> {
    let update = update.unwrap_or_default();
    let mut v = Violations::new();
    let changes = TenantChanges {
        name: update.name.as_deref().and_then(|s| tenant_name(&mut v, s)),
        reference: update
            .reference
            .as_deref()
            .and_then(|s| short_text(&mut v, "tenant.reference", s))
            .map(ShortText::into_inner),
        updated_at: Some(now),
    };
    if !v.is_empty() {
        return Err(Error::InvalidArgument(v.into_vec()));
    }
    Ok(changes)
}

/// Parses the etag of a conditional write; empty means unconditional.
pub fn etag(input: &str) -> Result<Option<Etag>, Error> {
    if input.is_empty() {
        return Ok(None);
    }
    Etag::parse(input)
        .map(Some)
        .map_err(|description| Error::invalid("etag", description))
}

pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub fn from_timestamp(time: &prost_types::Timestamp) -> Result<DateTime<Utc>, String> {
    u32::try_from(time.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(time.seconds, nanos))
        .ok_or_else(|| "must be a valid timestamp".to_owned())
}

impl From<UserRow> for pb::User {
    fn from(row: UserRow) -> Self {
        let custom_data = match &row.custom_data {
            serde_json::Value::Object(map) => super::json::json_to_struct(map),
            _ => prost_types::Struct::default(),
        };
        let etag = row.etag().to_string();
        Self {
            etag,
            id: row.id.to_string(),
            reference: row.reference,
            email: row.email,
            phone: Some(row.phone).filter(|p| !p.is_empty()),
            first_name: row.first_name,
            last_name: row.last_name,
            locale: row.locale,
            timezone: Some(row.timezone).filter(|t| !t.is_empty()),
            is_opted_in: row.is_opted_in,
            active: Some(row.active),
            synced: true,
            tenant_id: row.tenant_id.to_string(),
            custom_data: Some(custom_data),
            avatar_url: row.avatar_url,
            created_at: Some(timestamp(row.created_at)),
            updated_at: Some(timestamp(row.updated_at)),
            delete_time: row.delete_time.map(timestamp),
            expire_time: row.expire_time.map(timestamp),
            updated_by: Some({
                let (api_key_id, user_id) = Actor::parts(&row.updated_by);
                pb::Actor {
                    api_key_id: api_key_id.to_owned(),
                    user_id: user_id.to_owned(),
                    api_key_name: String::new(),
                }
            }),
        }
    }
}

/// A stored change event as watchers and the relay get it. A user whose
/// state the event no longer holds (purged) is its id and tenant only.
pub fn user_event(event: crate::store::events::Event) -> pb::UserEvent {
    let user = event
        .state
        .and_then(|state| serde_json::from_value::<UserRow>(state).ok())
        .map_or_else(
            || pb::User {
                id: event.user_id.to_string(),
                tenant_id: event.tenant_id.to_string(),
                ..Default::default()
            },
            pb::User::from,
        );
    let (api_key_id, user_id) = Actor::parts(&event.actor);
    pb::UserEvent {
        event_id: event.seq.to_string(),
        r#type: i32::from(event.kind),
        user: Some(user),
        changed_fields: Some(prost_types::FieldMask {
            paths: event.changed,
        }),
        commit_time: Some(timestamp(event.time)),
        actor: Some(pb::Actor {
            api_key_id: api_key_id.to_owned(),
            user_id: user_id.to_owned(),
            api_key_name: event.key_name.unwrap_or_default(),
        }),
        resume_token: event.position.encode(),
    }
}

impl From<TenantRow> for pb::Tenant {
    fn from(row: TenantRow) -> Self {
        Self {
            id: row.id.to_string(),
            name: row.name,
            reference: row.reference,
            created_at: Some(timestamp(row.created_at)),
            updated_at: Some(timestamp(row.updated_at)),
            delete_time: row.delete_time.map(timestamp),
            expire_time: row.expire_time.map(timestamp),
        }
    }
}
